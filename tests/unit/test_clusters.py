"""Several Slurm clusters behind one database: the pipeline's ``clusters:`` / ``cluster:``, the
per-cluster argv of SlurmClient (``-M NAME`` or a ``submit_via`` prefix), and the clients an
autoscale pass builds per cluster."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from pathlib import Path

import pytest

from scalebox_hpc.autoscaler import ClusterClients, LaunchCommand, stage_job
from scalebox_hpc.errors import PipelineError, ScaleboxError
from scalebox_hpc.pipeline import load_pipeline
from scalebox_hpc.slurm.client import SlurmClient
from scalebox_hpc.slurm.commands import CommandResult
from tests.helpers import write_app


class Recorder:
    """A CommandRunner that records argv and answers like sbatch/squeue of a multi-cluster site."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def run(self, argv: Sequence[str], *, timeout: float, input: str | None = None) -> CommandResult:
        self.calls.append(list(argv))
        if "sbatch" in argv[0] or any(a.endswith("sbatch") or "sbatch" in a for a in argv[:3]):
            return CommandResult("100007;c2\n", "", 0)
        return CommandResult("", "", 0)


APP = """
name: mc
cluster: c1
slurm: {time: "10", partition: batch, max_jobs: 5}
clusters:
  c1: {}
  c2:
    slurm: {partition: gpu, max_jobs: 3, account: proj2}
    local_scratch: /scratch/$${HOST}
    data_root: /data/c2
  far:
    submit_via: [ssh, login.far.example]
modules:
  a: {sink_modules: [b]}
  b: {cluster: c2, slurm: {max_jobs: 2}}
  c: {cluster: far}
"""


def _spec(tmp_path: Path, text: str = APP):  # type: ignore[no-untyped-def]
    return load_pipeline(write_app(tmp_path / "app", text, {f"{m}/run.sh": "true\n" for m in "abc"}))


def test_a_modules_cluster_settings_sit_between_the_apps_and_its_own(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    a, b, c = spec.modules
    assert (a.slurm.cluster, a.slurm.partition, a.slurm.max_jobs) == ("c1", "batch", 5)  # the app's default cluster
    assert (b.slurm.cluster, b.slurm.partition, b.slurm.max_jobs, b.slurm.account) == ("c2", "gpu", 2, "proj2")
    assert (b.slurm.local_scratch, b.slurm.data_root, b.slurm.time) == ("/scratch/${HOST}", "/data/c2", "10")
    assert (c.slurm.cluster, c.slurm.submit_via) == ("far", ["ssh", "login.far.example"])


def test_an_unknown_cluster_is_an_error_naming_line_and_key(tmp_path: Path) -> None:
    with pytest.raises(PipelineError) as err:
        _spec(tmp_path, APP.replace("cluster: c2, slurm", "cluster: c22, slurm"))
    assert ":15: modules.b.cluster: unknown cluster 'c22' (did you mean 'c2'?)" in str(err.value)


def test_cluster_keys_are_not_set_by_hand_under_slurm(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match=r"modules\.b\.slurm: unknown key 'cluster'"):
        _spec(tmp_path, APP.replace("slurm: {max_jobs: 2}", "slurm: {max_jobs: 2, cluster: c1}"))


def test_the_apps_cluster_alone_is_only_a_label(tmp_path: Path) -> None:
    """`cluster:` without `clusters:` (the older form) names the app's Slurm budget, no -M."""
    spec = _spec(tmp_path, 'name: x\ncluster: site\nmodules:\n  a: {}\n  b: {}\n  c: {}\n')
    assert all(m.slurm.cluster is None for m in spec.modules)


def test_commands_get_dash_m_right_after_their_name() -> None:
    runner = Recorder()
    client = SlurmClient(runner, cluster="c2", use_json=False)
    assert client.submit("#!/bin/sh\ntrue\n", ["--nodelist=n1"]) == "100007"
    client.cancel(["100007"])
    client.status(["100007"])
    # squeue knows nothing here, so sacct is asked too: every command names the cluster
    assert [c[:3] for c in runner.calls] == [["sbatch", "-M", "c2"], ["scancel", "-M", "c2"], ["squeue", "-M", "c2"],
                                             ["sacct", "-M", "c2"]]
    assert runner.calls[0][3:] == ["--parsable", "--nodelist=n1"]
    assert client.commands_run == 4 and client.cluster == "c2"


def test_a_submit_via_prefix_quotes_each_argument_for_the_remote_shell() -> None:
    runner = Recorder()
    client = SlurmClient(runner, cluster="far", prefix=["ssh", "login.far.example"], use_json=False)
    client.nodes(["n1; rm -rf ~"], partition="p $(id)")
    [argv] = runner.calls
    assert argv[:2] == ["ssh", "login.far.example"] and "-M" not in argv
    far = shlex.split(" ".join(argv[2:]))  # each value is one argument on the far side
    assert far[0] == "sinfo" and "--nodes=n1; rm -rf ~" in far and far[-1] == "--partition=p $(id)"
    client.cancel(["1"])
    assert shlex.split(" ".join(runner.calls[1][2:])) == ["scancel", "--", "1"]


def test_clients_are_built_once_per_cluster_and_counted_apart(tmp_path: Path) -> None:
    made: list[tuple[str, tuple[str, ...]]] = []
    default = SlurmClient(Recorder(), use_json=False)

    def make(cluster: str, via: Sequence[str]) -> SlurmClient:
        made.append((cluster, tuple(via)))
        return SlurmClient(Recorder(), cluster=cluster, prefix=via, use_json=False)

    clients = ClusterClients(default, make)
    for module in _spec(tmp_path).modules:
        clients.learn(module)
    assert clients.client(None) is default and clients.client("") is default
    clients.client("far").cancel(["1"])
    clients.client("far").cancel(["2"])
    clients.client("c2").cancel(["3"])
    assert made == [("far", ("ssh", "login.far.example")), ("c2", ())]
    assert clients.counts() == {"": 0, "far": 2, "c2": 1}


def test_a_stage_job_of_a_cluster_gets_its_scratch_and_data_root(tmp_path: Path) -> None:
    b = _spec(tmp_path).modules[1]
    job = stage_job(7, b, LaunchCommand(python="/venv/bin/python", work_root=tmp_path / "w"))
    assert job.launcher[:2] == ["env", "SCALEBOX_DATA_ROOT=/data/c2"]
    assert job.launcher[-2:] == ["--local-scratch", "/scratch/${HOST}"]


def test_the_autoscaler_takes_a_mapping_of_scheduler_clients() -> None:
    """Autoscaler(clients: Mapping[str, SchedulerClient]): '' is the default cluster's client,
    the others are named; a cluster the mapping lacks is a ScaleboxError with a hint."""
    default, far = SlurmClient(Recorder(), use_json=False), SlurmClient(Recorder(), cluster="far", use_json=False)
    clients = ClusterClients.of({"": default, "far": far})
    assert clients.client(None) is default and clients.client("far") is far
    assert list(clients) == ["", "far"] and len(clients) == 2 and "far" in clients and "near" not in clients
    assert ClusterClients.of(clients) is clients
    with pytest.raises(ScaleboxError, match="no Slurm client for cluster 'near'"):
        clients.client("near")
    with pytest.raises(ScaleboxError, match="no default Slurm client"):
        ClusterClients.of({"far": far})
