"""The standard modules (``code_path: scalebox:NAME``): each is a directory holding its ``run.sh``.

Most are bash scripts alone; ``cron`` is a Python package whose ``run.sh`` starts
``python -m scalebox_hpc.modules.cron`` with the launcher's interpreter."""
