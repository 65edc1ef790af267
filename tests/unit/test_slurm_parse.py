"""Slurm parsers fed with output captured from the real Slurm 22.05 test-bed (see slurm_fixtures/README.md)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from scalebox_hpc.slurm.environment import JobEnvironment, NotInSlurmJobError, SlurmEnvironmentError, in_slurm_job
from scalebox_hpc.slurm.parse import (
    SACCT_FIELDS,
    SQUEUE_FIELDS,
    JobInfo,
    NodeInfo,
    SlurmParseError,
    SlurmState,
    expand_hostlist,
    expand_job_ids,
    parse_duration,
    parse_exit_code,
    parse_sacct_delimited,
    parse_sbatch_parsable,
    parse_scontrol_record,
    parse_scontrol_show_job,
    parse_sinfo_nodes,
    parse_squeue_delimited,
    parse_squeue_json,
    parse_timestamp,
    translate_state,
)

FIXTURES = Path(__file__).parent / "slurm_fixtures"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def local(year: int, month: int, day: int, hour: int, minute: int, second: int) -> datetime:
    """A wall-clock time as Slurm printed it (local time of the capturing machine)."""
    return datetime(year, month, day, hour, minute, second).astimezone()


def by_id(infos: list[JobInfo]) -> dict[str, JobInfo]:
    return {i.job_id: i for i in infos}


# ---------------------------------------------------------------- states


def test_state_properties() -> None:
    terminal = {s for s in SlurmState if s.is_terminal}
    assert terminal == {
        SlurmState.COMPLETED, SlurmState.FAILED, SlurmState.CANCELLED, SlurmState.TIMEOUT, SlurmState.PREEMPTED,
        SlurmState.NODE_FAIL, SlurmState.OUT_OF_MEMORY, SlurmState.BOOT_FAIL, SlurmState.DEADLINE,
    }
    assert {s for s in SlurmState if s.is_resubmittable} == {
        SlurmState.TIMEOUT, SlurmState.PREEMPTED, SlurmState.NODE_FAIL}
    assert all(s.is_terminal for s in SlurmState if s.is_resubmittable)
    assert SlurmState.RUNNING.is_active and not SlurmState.UNKNOWN.is_active
    assert all(s.__doc__ for s in SlurmState)


@pytest.mark.parametrize(("native", "state"), [
    ("RUNNING", SlurmState.RUNNING),
    ("CANCELLED by 0", SlurmState.CANCELLED),
    ("CANCELLED+", SlurmState.CANCELLED),
    ("  completed ", SlurmState.COMPLETED),
    ("CD", SlurmState.COMPLETED),
    ("PD", SlurmState.PENDING),
    ("CONFIGURING", SlurmState.PENDING),
    ("OUT_OF_MEMORY", SlurmState.OUT_OF_MEMORY),
    ("OOM", SlurmState.OUT_OF_MEMORY),
    ("REQUEUE_HOLD", SlurmState.REQUEUED),
    ("STOPPED", SlurmState.SUSPENDED),
    ("SPECIAL_EXIT", SlurmState.FAILED),
    ("NODE_FAIL", SlurmState.NODE_FAIL),
    (["RUNNING", "COMPLETING"], SlurmState.COMPLETING),
    (["PENDING"], SlurmState.PENDING),
    ("", SlurmState.UNKNOWN),
    ("WHATEVER", SlurmState.UNKNOWN),
    (None, SlurmState.UNKNOWN),
])
def test_translate_state(native: object, state: SlurmState) -> None:
    assert translate_state(native) is state  # type: ignore[arg-type]


# ---------------------------------------------------------------- sbatch


def test_sbatch_parsable_captured() -> None:
    assert parse_sbatch_parsable(fixture("sbatch_parsable.txt")) == ("29", None)


@pytest.mark.parametrize(("text", "expected"), [
    ("123;c1\n", ("123", "c1")),
    ("123;cluster\n", ("123", "cluster")),
    ("456", ("456", None)),
    ("a site banner\n789\n", ("789", None)),
])
def test_sbatch_parsable_edge_cases(text: str, expected: tuple[str, str | None]) -> None:
    assert parse_sbatch_parsable(text) == expected


@pytest.mark.parametrize("text", ["", "\n\n", "Submitted batch job 12", "sbatch: error: nope", ";c1"])
def test_sbatch_parsable_garbage(text: str) -> None:
    with pytest.raises(SlurmParseError, match="sbatch --parsable"):
        parse_sbatch_parsable(text)


# ---------------------------------------------------------------- squeue --json


def test_squeue_json_captured() -> None:
    jobs = by_id(parse_squeue_json(fixture("squeue.json")))
    assert sorted(jobs) == ["29", "30", "31", "32", "33_1", "33_2", "33_3", "33_4"]
    ok, fail, long, pend = jobs["29"], jobs["30"], jobs["31"], jobs["32"]
    assert (ok.state, ok.exit_code, ok.nodes, ok.name) == (SlurmState.COMPLETED, 0, ["node1"], "cap_ok")
    assert (fail.state, fail.exit_code, fail.signal, fail.reason) == (SlurmState.FAILED, 3, 0, "NonZeroExitCode")
    assert long.state is SlurmState.RUNNING and long.nodes == ["node2", "node3"]
    assert long.time_limit == timedelta(minutes=5) and long.exit_code is None
    assert long.end_time == datetime.fromtimestamp(1795596030, tz=UTC)
    assert (pend.state, pend.reason, pend.end_time, pend.name) == (SlurmState.PENDING, "BeginTime", None, "cap pend")
    assert jobs["33_1"].raw_id == "34" and jobs["33_1"].end_time is None  # unlimited: no made-up end
    assert jobs["33_3"].state is SlurmState.PENDING and jobs["33_3"].raw_id is None


def test_squeue_json_newer_shapes() -> None:
    text = """{"jobs": [{"job_id": 7, "name": "x", "job_state": ["RUNNING", "COMPLETING"], "nodes": "n[1-2]",
      "exit_code": {"status": ["EXITED"], "return_code": {"set": true, "infinite": false, "number": 2},
                    "signal": {"id": {"set": false, "infinite": false, "number": 0}, "name": ""}},
      "end_time": {"set": true, "infinite": false, "number": 1700000000},
      "time_limit": {"set": true, "infinite": false, "number": 30}}], "errors": []}"""
    (info,) = parse_squeue_json(text)
    assert (info.state, info.exit_code, info.signal) == (SlurmState.COMPLETING, 2, None)
    assert info.time_limit == timedelta(minutes=30) and info.nodes == ["n1", "n2"]
    assert info.end_time == datetime.fromtimestamp(1700000000, tz=UTC)


@pytest.mark.parametrize("text", ["", "not json", "[]", '{"meta": {}}', '{"jobs": [{"name": "no id"}]}'])
def test_squeue_json_garbage(text: str) -> None:
    with pytest.raises(SlurmParseError, match="squeue --json"):
        parse_squeue_json(text)


def test_squeue_json_errors_reported() -> None:
    with pytest.raises(SlurmParseError, match="errors reported"):
        parse_squeue_json('{"jobs": [], "errors": [{"error": "Unable to contact slurm controller"}]}')


def test_squeue_json_empty_job_list() -> None:
    assert parse_squeue_json('{"jobs": [], "errors": []}') == []


# ---------------------------------------------------------------- sacct --json


def test_squeue_format_matches_fields() -> None:
    assert SQUEUE_FIELDS[-1] == "Name" and SACCT_FIELDS[-1] == "JobName"


def test_squeue_delimited_captured() -> None:
    jobs = by_id(parse_squeue_delimited(fixture("squeue_delimited.txt")))
    assert sorted(jobs) == ["29", "30", "31", "32", "33_1", "33_2", "33_3", "33_4"]
    assert (jobs["30"].state, jobs["30"].exit_code, jobs["30"].signal) == (SlurmState.FAILED, 3, 0)
    assert jobs["31"].end_time == local(2026, 11, 25, 8, 40, 30)
    assert jobs["31"].time_limit == timedelta(minutes=5) and jobs["31"].nodes == ["node2", "node3"]
    assert (jobs["32"].name, jobs["32"].end_time, jobs["32"].nodes) == ("cap pend", None, [])
    assert jobs["33_2"].reason == "JobArrayTaskLimit" and jobs["33_1"].raw_id == "34"


def test_squeue_delimited_after_cancel() -> None:
    jobs = by_id(parse_squeue_delimited(fixture("squeue_delimited_after_cancel.txt")))
    assert {j.state for k, j in jobs.items() if k not in ("29", "30")} == {SlurmState.CANCELLED}
    assert (jobs["31"].exit_code, jobs["31"].signal) == (0, 15)  # raw wait status 15 = SIGTERM
    assert jobs["31"].end_time == local(2026, 11, 25, 8, 35, 32)


def test_squeue_delimited_name_with_pipe_and_empty() -> None:
    row = "5|5|RUNNING|node1|None|NONE|1-00:00:00|0|a|b|\n"
    (info,) = parse_squeue_delimited(row)
    assert info.name == "a|b" and info.time_limit == timedelta(days=1)
    assert parse_squeue_delimited("") == []


@pytest.mark.parametrize("text", ["garbage\n", "1|2|3\n", "x|1|RUNNING|n1|None|NONE|5:00|0|n|\n",
                                  "1|1|RUNNING|node[1-|None|NONE|5:00|0|n|\n"])
def test_squeue_delimited_garbage(text: str) -> None:
    with pytest.raises(SlurmParseError):
        parse_squeue_delimited(text)


# ---------------------------------------------------------------- delimited sacct


def test_sacct_completion_captured() -> None:
    jobs = by_id(parse_sacct_delimited(fixture("sacct_completion.txt")))
    assert sorted(jobs) == ["29", "30", "31", "32", "33"]
    assert (jobs["30"].state, jobs["30"].exit_code) == (SlurmState.FAILED, 3)
    assert (jobs["31"].state, jobs["31"].time_limit) == (SlurmState.CANCELLED, timedelta(minutes=5))
    assert jobs["31"].end_time == local(2026, 11, 25, 8, 35, 32)
    assert jobs["33"].nodes == []  # "(null)"
    # jobcomp/filetxt cannot store a name with a space: the record comes back without a state
    assert (jobs["32"].state, jobs["32"].name) == (SlurmState.UNKNOWN, "cap")


def test_sacct_delimited_steps_duplicates_and_cancelled_by() -> None:
    text = (
        "7|7|CANCELLED by 0|0:15|node1|2026-01-01T00:00:00|60||stage\n"
        "7.batch|7.batch|CANCELLED|0:15|node1|2026-01-01T00:00:00|||batch\n"
        "8|8|NODE_FAIL|0:0|node2|2026-01-01T00:00:00|Partition_Limit||old\n"
        "8|8|RUNNING|0:0|node3|Unknown|Partition_Limit||requeued\n"
        "9_[1-2]|9|PENDING|0:0|None assigned|Unknown|UNLIMITED|Priority|arr\n"
    )
    jobs = by_id(parse_sacct_delimited(text))
    assert sorted(jobs) == ["7", "8", "9_1", "9_2"]
    assert (jobs["7"].state, jobs["7"].signal, jobs["7"].time_limit) == (SlurmState.CANCELLED, 15, timedelta(hours=1))
    assert (jobs["8"].name, jobs["8"].state, jobs["8"].end_time) == ("requeued", SlurmState.RUNNING, None)
    assert jobs["9_2"].nodes == [] and jobs["9_2"].reason == "Priority" and jobs["9_2"].exit_code is None


def test_sacct_delimited_garbage() -> None:
    with pytest.raises(SlurmParseError, match="sacct row"):
        parse_sacct_delimited("Slurm accounting storage is disabled\n")


# ---------------------------------------------------------------- scontrol -o show job


def test_scontrol_running_captured() -> None:
    (info,) = parse_scontrol_show_job(fixture("scontrol_running.txt"))
    assert (info.job_id, info.state, info.nodes) == ("31", SlurmState.RUNNING, ["node2", "node3"])
    assert info.end_time == local(2026, 11, 25, 8, 40, 30)
    assert info.time_limit == timedelta(minutes=5) and info.exit_code is None


def test_scontrol_pending_failed_array_captured() -> None:
    (pend,) = parse_scontrol_show_job(fixture("scontrol_pending.txt"))
    assert (pend.name, pend.state, pend.reason, pend.end_time, pend.nodes) == (
        "cap pend", SlurmState.PENDING, "BeginTime", None, [])
    (fail,) = parse_scontrol_show_job(fixture("scontrol_failed.txt"))
    assert (fail.state, fail.exit_code, fail.end_time) == (SlurmState.FAILED, 3, local(2026, 11, 25, 8, 35, 30))
    arr = by_id(parse_scontrol_show_job(fixture("scontrol_array.txt")))
    assert sorted(arr) == ["33_1", "33_2", "33_3", "33_4"]
    assert arr["33_1"].raw_id == "34" and arr["33_1"].state is SlurmState.RUNNING


def test_scontrol_record_keys_and_odd_values() -> None:
    rec = parse_scontrol_record(fixture("scontrol_running.txt"))
    assert rec["AllocNode:Sid"] == "localhost:20026"
    assert rec["TRES"] == "cpu=2,mem=512M,node=2,billing=2"
    assert rec["ReqB:S:C:T"] == "0:0:*:*" and rec["CPUs/Task"] == "1" and rec["Power"] == ""
    line = ("JobId=5 JobName=my job  x=1 JobState=RUNNING Reason=None Command=/data/run me.sh a=b "
            "WorkDir=/data/with space StdOut=/o.txt Unknown=kept")
    rec = parse_scontrol_record(line)
    assert rec["JobName"] == "my job  x=1"
    assert rec["Command"] == "/data/run me.sh a=b"
    assert rec["WorkDir"] == "/data/with space"
    assert rec["StdOut"] == "/o.txt Unknown=kept"  # an unknown key inside a space-valued key stays in it


def test_scontrol_garbage() -> None:
    with pytest.raises(SlurmParseError):
        parse_scontrol_show_job(fixture("scontrol_unknown.txt"))
    with pytest.raises(SlurmParseError):
        parse_scontrol_show_job("JobName=no-id JobState=RUNNING\n")
    assert parse_scontrol_show_job("") == []


# ---------------------------------------------------------------- small values


@pytest.mark.parametrize(("text", "expected"), [
    ("12", ["12"]),
    ("12_3", ["12_3"]),
    ("12+1", ["12+1"]),
    ("12_[2,4-6]", ["12_2", "12_4", "12_5", "12_6"]),
    ("33_[2-4%1]", ["33_2", "33_3", "33_4"]),
    ("7_[5]", ["7_5"]),
])
def test_expand_job_ids(text: str, expected: list[str]) -> None:
    assert expand_job_ids(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "12_", "12_[", "12_[4-2]", "12_[a-b]", "12_[1,,2]", "12.batch"])
def test_expand_job_ids_garbage(text: str) -> None:
    with pytest.raises(SlurmParseError):
        expand_job_ids(text)


@pytest.mark.parametrize(("text", "expected"), [
    ("node[1-3,7]", ["node1", "node2", "node3", "node7"]),
    ("node[2-3]", ["node2", "node3"]),
    ("gpu01,cpu[08-10]", ["gpu01", "cpu08", "cpu09", "cpu10"]),
    ("node1", ["node1"]),
    ("", []),
    ("(null)", []),
    ("None assigned", []),
    (None, []),
])
def test_expand_hostlist(text: str | None, expected: list[str]) -> None:
    assert expand_hostlist(text) == expected


def test_expand_hostlist_garbage() -> None:
    with pytest.raises(SlurmParseError, match="hostlist"):
        expand_hostlist("node[1-")


@pytest.mark.parametrize(("text", "expected"), [
    ("5:00", timedelta(minutes=5)),
    ("00:05:00", timedelta(minutes=5)),
    ("365-00:00:00", timedelta(days=365)),
    ("1-12", timedelta(days=1, hours=12)),
    ("1-12:30", timedelta(days=1, hours=12, minutes=30)),
    ("90", timedelta(minutes=90)),
    ("UNLIMITED", None),
    ("Partition_Limit", None),
    ("INFINITE", None),
])
def test_parse_duration(text: str, expected: timedelta | None) -> None:
    assert parse_duration(text) == expected


def test_parse_duration_timestamp_exit_garbage() -> None:
    for bad_call in (lambda: parse_duration("5 min"), lambda: parse_timestamp("Tomorr 08:31"),
                     lambda: parse_exit_code("x:0"), lambda: parse_exit_code("1:")):
        with pytest.raises(SlurmParseError):
            bad_call()


def test_parse_exit_code() -> None:
    assert parse_exit_code("3:0") == (3, 0)
    assert parse_exit_code("0:15") == (0, 15)
    assert parse_exit_code("768") == (3, 0)
    assert parse_exit_code("9") == (0, 9)
    assert parse_exit_code("") == (None, None)


def test_parse_timestamp() -> None:
    assert parse_timestamp("2026-11-25T08:40:30") == local(2026, 11, 25, 8, 40, 30)
    assert parse_timestamp("Unknown") is None and parse_timestamp("NONE") is None


# ---------------------------------------------------------------- job environment


def env_file(name: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in fixture(name).splitlines() if "=" in line)


def test_environment_batch_script_captured() -> None:
    env = JobEnvironment.from_env(env_file("env_batch.txt"))
    assert (env.job_id, env.node_name, env.node_list, env.num_nodes) == ("31", "node2", ["node2", "node3"], 2)
    assert (env.procid, env.localid, env.nodeid, env.ntasks, env.cpus_per_task) == (0, 0, 0, None, None)
    assert env.end_time is None and env.job_name == "cap_long" and env.is_first_task


def test_environment_srun_task_captured() -> None:
    env = JobEnvironment.from_env(env_file("env_srun_task1.txt"))
    assert (env.job_id, env.node_name, env.node_list) == ("28", "node2", ["node1", "node2"])
    assert (env.procid, env.localid, env.nodeid, env.ntasks, env.cpus_per_task) == (1, 0, 1, 2, 1)
    assert not env.is_first_task


def test_environment_edge_cases() -> None:
    env = JobEnvironment.from_env({"SLURM_JOBID": "9", "SLURM_NODELIST": "c[01-02]", "SLURM_JOB_END_TIME": "1700000000",
                                   "SLURM_ARRAY_JOB_ID": "8", "SLURM_ARRAY_TASK_ID": "1"})
    assert (env.job_id, env.node_name, env.num_nodes) == ("9", "c01", 2)
    assert env.end_time == datetime.fromtimestamp(1700000000, tz=UTC)
    assert (env.array_job_id, env.array_task_id) == ("8", "1")
    assert not in_slurm_job({}) and in_slurm_job({"SLURM_JOB_ID": "1"})
    with pytest.raises(NotInSlurmJobError):
        JobEnvironment.from_env({"PATH": "/bin"})
    with pytest.raises(SlurmEnvironmentError, match="SLURM_PROCID"):
        JobEnvironment.from_env({"SLURM_JOB_ID": "1", "SLURM_PROCID": "x"})


def test_sinfo_nodes_merge_partitions_and_read_idle_cpus() -> None:
    text = ("node1|debug*|idle|0/2/0/2\nnode1|long|idle|0/2/0/2\nnode2|debug*|mixed|1/1/0/2\n"
            "node3|debug*|down*|0/0/2/2\nnode4|debug*|idle~|0/2/0/2\n\n")
    nodes = parse_sinfo_nodes(text)
    assert nodes["node1"] == NodeInfo("node1", "idle", 2, ("debug", "long"))
    assert [n for n, info in nodes.items() if info.available] == ["node1", "node2"]
    assert nodes["node2"].idle_cpus == 1


@pytest.mark.parametrize("line", ["node1|debug|idle", "node1|debug|idle|2"])
def test_sinfo_nodes_reject_what_they_do_not_understand(line: str) -> None:
    with pytest.raises(SlurmParseError):
        parse_sinfo_nodes(line)
