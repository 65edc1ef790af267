"""``python -m scalebox_hpc`` = the ``scalebox`` command."""

import sys

if "--stage-job" in sys.argv:  # before the imports: a walltime warning may already be on its way
    from scalebox_hpc import early_signals

    early_signals.install()

from scalebox_hpc.cli import main

main()
