"""The standard module ``scalebox:cron``: one long-running task that sends the time of each tick
(``YYYY-MM-DDTHH:MM:SS``, UTC) to the modules named in a ``cron.txt`` of ``SCHEDULE,MODULE`` lines.

:mod:`.schedule` parses the file and computes ticks (pure); :mod:`.loop` runs the schedule against an
injected clock and a sink; :mod:`.database` is the sink that writes each tick to the queue at the
tick; ``python -m scalebox_hpc.modules.cron`` (run by ``run.sh``) wires them from the environment."""
