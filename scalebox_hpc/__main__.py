"""``python -m scalebox_hpc`` = the ``scalebox`` command."""

from scalebox_hpc.cli import main

main()
