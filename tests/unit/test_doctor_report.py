"""The probe report parser: whatever a probe job's output file holds (site banners, tracebacks,
a line cut when the job was killed, megabytes of noise, binary junk), it returns the report or
raises ProbeParseError, nothing else."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scalebox_hpc.doctor.report import (
    MAX_OUTPUT,
    TAG,
    DatabaseFacts,
    PathFacts,
    ProbeParseError,
    ProbeReport,
    PythonFacts,
    parse_report,
    render_report,
)

REPORT = ProbeReport(host="node1", python=PythonFacts(executable="/v/bin/python", version="3.11.2", scalebox="0.1"),
                     db=DatabaseFacts(ok=True, dsn="postgresql://me@db:5432/x", skew_seconds=-0.25),
                     paths=[PathFacts(role="scratch", path="/local", writable=True, free_bytes=10)])

_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=300)
_noise_lines = st.lists(_text.filter(lambda s: TAG not in s), max_size=8).map(lambda lines: "\n".join(lines))

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)


def test_a_rendered_report_round_trips() -> None:
    assert parse_report(render_report(REPORT)) == REPORT
    assert parse_report(render_report(REPORT).encode()) == REPORT


@given(before=_noise_lines, after=_noise_lines)
@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
def test_the_report_is_found_among_any_noise(before: str, after: str) -> None:
    output = f"{before}\n{render_report(REPORT)}\n{after}"
    assert parse_report(output) == REPORT


@given(garbage=st.binary(max_size=2000) | _text)
@settings(max_examples=300)
def test_garbage_raises_the_parse_error_only(garbage: bytes | str) -> None:
    with pytest.raises(ProbeParseError):
        parse_report(garbage)


@given(cut=st.integers(min_value=0, max_value=len(render_report(REPORT)) - 1))
@settings(max_examples=200)
def test_a_truncated_report_is_an_error_not_a_crash(cut: int) -> None:
    with pytest.raises(ProbeParseError):
        parse_report("banner\n" + render_report(REPORT)[:cut])


@given(fields=st.dictionaries(st.sampled_from(["host", "python", "db", "engine", "paths", "resources", "gpu",
                                               "mpi", "other"]), _json_values, max_size=6))
@settings(max_examples=300)
def test_tagged_json_of_any_shape_is_a_report_or_the_parse_error(fields: dict[str, object]) -> None:
    line = json.dumps({TAG: 1, **fields})
    try:
        report = parse_report(line)
    except ProbeParseError:
        return
    assert isinstance(report, ProbeReport)


def test_huge_output_is_read_from_its_end_only() -> None:
    noise = ("x" * 1000 + "\n") * (3 * MAX_OUTPUT // 1000)
    assert parse_report(noise + render_report(REPORT) + "\n") == REPORT
    with pytest.raises(ProbeParseError):
        parse_report(render_report(REPORT) + "\n" + noise)  # the report scrolled out of the last MiB


def test_a_deeply_nested_line_is_an_error_not_a_recursion_crash() -> None:
    with pytest.raises(ProbeParseError):
        parse_report('{"' + TAG + '": 1, "host": ' + "[" * 100_000 + "]" * 100_000 + "}")


def test_the_last_valid_report_wins_and_other_versions_are_refused() -> None:
    older = render_report(ProbeReport(host="old"))
    assert parse_report(f"{older}\n{render_report(REPORT)}\n").host == "node1"
    with pytest.raises(ProbeParseError, match="another version"):
        parse_report(json.dumps({TAG: 2, "host": "x"}))
    assert parse_report(f"{render_report(REPORT)}\n" + json.dumps({TAG: 1, "paths": "not a list"})).host == "node1"


def test_missing_parts_default_to_not_found() -> None:
    report = parse_report(json.dumps({TAG: 1}))
    assert not report.db.ok and report.paths == [] and report.path("scratch") is None
