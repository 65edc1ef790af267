"""The autoscaler's former module name: ``scalebox_hpc.stages`` is :mod:`scalebox_hpc.autoscaler`
(kept so that imports written against the old name keep working)."""

from scalebox_hpc.autoscaler import *  # noqa: F403
