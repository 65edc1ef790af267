"""The in-run helpers (``scalebox task add``, ``scalebox app set-finished``, ``send-message``,
``send-job-message``) in POSIX sh, for containers (runtime/container_bin) and bare runs
(launcher/bin, which sources the same script and hands what it cannot do to the Python CLI).

- the records are the Python CLI's, byte for byte (``--headers-json`` aside: sh passes it on as
  a string that the host parses as the CLI does, so the collected message is the same);
- a bare run's usage and input errors are the Python CLI's own (exit code, stderr), nothing written;
- whatever the arguments (audit F15), the collector reads back exactly the message the Python
  CLI would have made, or one clear problem where the CLI refuses the input.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scalebox_hpc.cli.tasks import _body_arg, _parse_headers
from scalebox_hpc.errors import InvalidMessageError
from scalebox_hpc.launcher import taskexec
from scalebox_hpc.launcher.slot import HELPER_BIN
from scalebox_hpc.models import Message, validate_headers
from scalebox_hpc.runtime.container import CONTAINER_BIN

MODULES = ["calc", "gather"]
SETTINGS = settings(max_examples=int(os.environ.get("HELPER_EXAMPLES", "60")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
SHELLS = [s for s in ("dash", "bash") if shutil.which(s)] + (["busybox"] if shutil.which("busybox") else [])
Arg = str | bytes


def env_for(emit: Path, **extra: str) -> dict[str, str]:
    return {"SCALEBOX_EMIT_FILE": str(emit), "PATH": f"{HELPER_BIN}{os.pathsep}/usr/bin:/bin",
            "SCALEBOX_PYTHON": sys.executable, **extra}


def run(argv: Sequence[Arg], env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([os.fsencode(a) for a in argv], env=env, capture_output=True, check=False)


def bare(emit: Path, *args: Arg, **extra: str) -> subprocess.CompletedProcess[bytes]:
    """A helper as a bare run.sh calls it: launcher/bin on PATH."""
    return run([HELPER_BIN / str(args[0]), *args[1:]], env_for(emit, **extra))


def container(emit: Path, *args: Arg, shell: str = "dash") -> subprocess.CompletedProcess[bytes]:
    """A helper as a container's run.sh calls it (POSIX sh, no Python on PATH)."""
    argv0 = [shell, "sh"] if shell == "busybox" else [shell]
    return run([*argv0, CONTAINER_BIN / str(args[0]), *args[1:]],
               {"SCALEBOX_EMIT_FILE": str(emit), "PATH": "/usr/bin:/bin"})


def python_cli(emit: Path, *args: Arg) -> subprocess.CompletedProcess[bytes]:
    """The Python CLI itself (what every bare call ran before the sh path)."""
    return run([sys.executable, "-m", "scalebox_hpc", *args], env_for(emit))


def emitted(emit: Path) -> bytes:
    data = emit.read_bytes() if emit.exists() else b""
    emit.unlink(missing_ok=True)
    return data


def collected(work: Path, data: bytes) -> taskexec.ExecReport:
    emit = work / "collect.jsonl"
    emit.write_bytes(data)
    return taskexec.collect(work, emit, MODULES)


# -- the same records as the Python CLI -----------------------------------------------------------

SAME_RECORDS: list[list[Arg]] = [
    ["task", "add", "b"],
    ["task", "add", "-m", "calc", "-H", "k=v", "--", "b1", "-b2", "--"],
    ["task", "add", "b1", "-m", "calc", "b2", "--sink-module=gather", "-Hx=1", "--header", "y==2", "--header=z=3"],
    ["task", "add", "-H", "a=1", "-H", "b=2", "-H", "a=3", "-H", "a=", "b"],  # a repeated key keeps its place
    ["task", "add", "-mcalc", "--module", "", "b"],  # the last -m wins, empty included
    ["task", "add", "-H", 'q"u\\o=te"\\', "--", 'say "hi" \\n $(ls) `x`\nline2\ttab \r\b\f\x01\x1b\x1f\x7f ünï ☃'],
    ["task", "add", "-m", 'mo"d\n{"kind": "finish"}', "--", "{},\n{\"kind\": \"finish\", \"text\": \"x\"}"],
    ["task", "add", "--", "-", "--", "-m", "x" * 131071],
    ["app", "set-finished", "Result is 1229"],
    ["app", "set-finished", "--job-id", "7", "--", "--job-id=8"],
    ["app", "set-finished", 'a"b\\c\nd', "--job-id=7"],
]


@pytest.mark.parametrize("args", SAME_RECORDS, ids=range(len(SAME_RECORDS)))
def test_the_sh_helper_writes_the_python_cli_records(tmp_path: Path, args: list[Arg]) -> None:
    emit = tmp_path / "emit.jsonl"
    done = python_cli(emit, *args)
    assert done.returncode == 0, done.stderr
    expected = emitted(emit)
    assert expected
    done = bare(emit, "scalebox", *args)
    assert (done.returncode, done.stderr) == (0, b"")
    assert emitted(emit) == expected
    for shell in SHELLS:
        done = container(emit, "scalebox", *args, shell=shell)
        assert (done.returncode, done.stderr) == (0, b""), shell
        assert emitted(emit) == expected, shell


@pytest.mark.parametrize("headers", ['{"k": [1, 2.5e3, {"x": null}], "n": -0}', ' \n{"a": 1, "a": 2, "b": "\\u00e9"}\t',
                                     '{"k": 1}'])
def test_headers_json_gives_the_python_cli_message(tmp_path: Path, headers: str) -> None:
    emit = tmp_path / "emit.jsonl"
    args = ["task", "add", "-H", "k=v", "--headers-json", headers, "-m", "calc", "--", "b"]
    assert python_cli(emit, *args).returncode == 0
    expected = collected(tmp_path, emitted(emit))
    assert expected.problems == [] and len(expected.messages) == 1
    assert bare(emit, "scalebox", *args).returncode == 0
    got = collected(tmp_path, emitted(emit))
    assert got.problems == [] and got.messages == expected.messages
    assert container(emit, "send-job-message", "calc", "b", headers).returncode == 0
    assert bare(emit, "send-job-message", "calc", "b", headers).returncode == 0
    both = collected(tmp_path, emitted(emit))
    assert both.problems == [] and len(both.messages) == 2
    assert all(m.headers == json.loads(headers) for m in both.messages)


# -- errors: a bare run gets the Python CLI's, a container the sh helper's ------------------------

ERRORS: list[list[Arg]] = [
    ["task", "add"],
    ["task", "add", "-m"],
    ["task", "add", "-x", "b"],
    ["task", "add", "--mod", "calc", "b"],
    ["task", "add", "-H", "novalue", "b"],
    ["task", "add", "-H", "=v", "b"],
    ["task", "add", "-H", "to_slot=abc", "b"],
    ["task", "add", "--headers-json", "[1]", "b"],
    ["task", "add", "--headers-json", "nope", "b"],
    ["task", "add", "--app", "0", "b"],
    ["task", "add", "--file", "/nonexistent"],
    ["app", "set-finished"],
    ["app", "set-finished", "a", "b"],
    ["app", "set-finished", "--job-id"],
    ["app", "set-finished", "--bogus", "a"],
]


@pytest.mark.parametrize("args", ERRORS, ids=range(len(ERRORS)))
def test_a_bare_run_gets_the_python_cli_error(tmp_path: Path, args: list[Arg]) -> None:
    emit = tmp_path / "emit.jsonl"
    expected = python_cli(emit, *args)
    assert expected.returncode in (1, 2) and not emit.exists()
    done = bare(emit, "scalebox", *args)
    assert (done.returncode, done.stderr) == (expected.returncode, expected.stderr)
    assert not emit.exists()


@pytest.mark.parametrize("args", ERRORS, ids=range(len(ERRORS)))
def test_a_container_error_is_one_line_and_writes_nothing(tmp_path: Path, args: list[Arg]) -> None:
    emit = tmp_path / "emit.jsonl"
    done = container(emit, "scalebox", *args)
    lines = done.stderr.decode().splitlines()
    if args[2:] == ["-H", "to_slot=abc", "b"]:  # only the host checks a header's value
        assert done.returncode == 0
        report = collected(tmp_path, emitted(emit))
        assert report.messages == [] and len(report.problems) == 1 and "to_slot" in report.problems[0]
        return
    assert done.returncode in (1, 2) and len(lines) == 1 and lines[0].startswith("scalebox: "), done.stderr
    assert not emit.exists()


def test_an_empty_body_in_a_container_is_refused(tmp_path: Path) -> None:
    done = container(tmp_path / "emit.jsonl", "send-message", "")
    assert (done.returncode, done.stderr) == (2, b"scalebox: task add: empty body\n")


def test_send_message_usage(tmp_path: Path) -> None:
    for name, expected in (("send-message", b"usage: send-message BODY [HEADERS_JSON]\n"),
                           ("send-job-message", b"usage: send-job-message MODULE BODY [HEADERS_JSON]\n")):
        assert (bare(tmp_path / "e", name).returncode, bare(tmp_path / "e", name).stderr) == (2, expected)
        assert (container(tmp_path / "e", name).returncode, container(tmp_path / "e", name).stderr) == (2, expected)


def test_other_commands_and_calls_outside_a_task_go_to_the_python_cli(tmp_path: Path) -> None:
    emit = tmp_path / "emit.jsonl"
    done = bare(emit, "scalebox", "semaphore", "--help")
    assert done.returncode == 0 and b"Usage: scalebox semaphore" in done.stdout
    done = bare(emit, "scalebox", "task", "add", "--help")
    assert done.returncode == 0 and b"Usage: scalebox task add" in done.stdout
    # no SCALEBOX_EMIT_FILE: the Python CLI, which would talk to the database
    done = bare(emit, "scalebox", "task", "add", "--help", SCALEBOX_EMIT_FILE="")
    assert done.returncode == 0 and b"Usage: scalebox task add" in done.stdout
    assert not emit.exists()


def test_the_callers_locale_reaches_the_python_cli(tmp_path: Path) -> None:
    # the sh path works in LC_ALL=C; a call it hands over must not inherit that
    done = bare(tmp_path / "emit.jsonl", "scalebox", "task", "add", "-x", "b", LC_ALL="C.UTF-8")
    assert done.returncode == 2
    script = 'import os; print(os.environ.get("LC_ALL", "-"))'
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\nexec {sys.executable} -c '{script}'\n")
    fake.chmod(0o755)
    for extra, shown in (({"LC_ALL": "C.UTF-8"}, b"C.UTF-8\n"), ({}, b"-\n")):
        done = bare(tmp_path / "emit.jsonl", "scalebox", "task", "add", "-x", "b", SCALEBOX_PYTHON=str(fake), **extra)
        assert done.stdout == shown


# -- F15: any argument, exactly the message the Python CLI would make ------------------------------

HOSTILE = ["\n", "\r\n", '"', "\\", "\\n", "\\u0000", '"}', '{"kind": "finish", "text": "x"}', "\n{", "},{", "--",
           "-m", "=", "\x01", "\x1b[2J", "\x7f", "é", "☃", "\u2028", "\ufeff"]
text_args = st.one_of(
    st.text(st.characters(exclude_characters="\x00", exclude_categories=("Cs",)), max_size=30),
    st.lists(st.sampled_from(HOSTILE), max_size=8).map("".join),
)
# argv bytes: mostly UTF-8 text, sometimes bytes that are not UTF-8 at all
arg_bytes = st.one_of(text_args.map(str.encode), text_args.map(str.encode), text_args.map(str.encode),
                      st.binary(max_size=20).map(lambda b: b.replace(b"\x00", b"")))
header_keys = arg_bytes.map(lambda b: b.replace(b"=", b"")).filter(bool)
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | text_args,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text_args, inner, max_size=3),
                           max_leaves=8)
headers_json = st.one_of(st.none(), st.dictionaries(text_args, json_values, max_size=4).map(json.dumps),
                         st.builds(lambda t: "{" + t + "}", text_args), text_args)


def python_outcome(work: Path, body: bytes, module: bytes | None, pairs: list[tuple[bytes, bytes]],
                   hjson: str | None) -> list[Message] | None:
    """The messages the Python CLI's record gives the collector, or None: refused (at the call or
    by the collector)."""
    try:
        text = _body_arg(os.fsdecode(body))
        hdrs = validate_headers(_parse_headers(tuple(os.fsdecode(k + b"=" + v) for k, v in pairs), hjson))
        name = None if module is None else os.fsdecode(module)
        item = {"kind": "task", "body": text, "headers": hdrs, "module": name}
        line = (json.dumps(item, ensure_ascii=False) + "\n").encode("utf-8")  # what cli.tasks._buffer_tasks writes
    except (InvalidMessageError, UnicodeEncodeError):
        return None
    report = collected(work, line)
    return report.messages if not report.problems else None


@pytest.mark.parametrize("where", ["container", "bare"])
@SETTINGS
@given(body=arg_bytes.filter(bool), module=st.none() | arg_bytes,
       pairs=st.lists(st.tuples(header_keys, arg_bytes), max_size=3), hjson=headers_json)
def test_any_arguments_give_the_python_cli_message_or_a_clear_error(
        tmp_path: Path, where: str, body: bytes, module: bytes | None, pairs: list[tuple[bytes, bytes]],
        hjson: str | None) -> None:
    args: list[Arg] = ["task", "add"]
    if module is not None:
        args += ["-m", module]
    for key, value in pairs:
        args += ["-H", key + b"=" + value]
    if hjson is not None:
        args += ["--headers-json", hjson]
    args += ["--", body]
    emit = tmp_path / "emit.jsonl"
    emit.unlink(missing_ok=True)
    done = container(emit, "scalebox", *args) if where == "container" else bare(emit, "scalebox", *args)
    data = emitted(emit)
    expected = python_outcome(tmp_path, body, module, pairs, hjson)
    if done.returncode != 0:
        assert expected is None and data == b"", (done.stderr, expected)
        assert len(done.stderr.splitlines()) >= 1
        return
    assert data.count(b"\n") == 1 and data.endswith(b"\n")  # one record, whole
    report = collected(tmp_path, data)
    assert report.finish_text is None
    if expected is None:
        assert report.messages == [] and len(report.problems) == 1, report.problems
    else:
        assert report.problems == [] and report.messages == expected


@SETTINGS
@given(text=arg_bytes, job=arg_bytes)
def test_any_finish_text_is_read_back_as_it_was_or_refused(tmp_path: Path, text: bytes, job: bytes) -> None:
    emit = tmp_path / "emit.jsonl"
    done = container(emit, "scalebox", "app", "set-finished", "--job-id", job, "--", text)
    assert done.returncode == 0, done.stderr
    data = emitted(emit)
    assert data.count(b"\n") == 1
    report = collected(tmp_path, data)
    try:
        expected = text.decode("utf-8")
    except UnicodeDecodeError:
        assert report.finish_text is None and report.problems == ["emitted message 1: finish text is not valid UTF-8"]
        return
    assert report.problems == [] and report.finish_text == expected and report.messages == []


long_texts = st.builds(lambda parts, pad: "".join(parts) + "y" * pad,
                       st.lists(st.sampled_from([*HOSTILE, "x" * 500, "é" * 300]), min_size=1, max_size=60),
                       st.integers(min_value=4097, max_value=6000))


@pytest.mark.parametrize("shell", SHELLS)
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=long_texts)
def test_long_texts_are_escaped_as_python_escapes_them(tmp_path: Path, shell: str, text: str) -> None:
    # over 4 KiB the escaping is awk's, in linear time; the bytes must not change
    emit = tmp_path / "emit.jsonl"
    done = container(emit, "scalebox", "task", "add", "-H", f"k={text}", "--", text, shell=shell)
    assert done.returncode == 0, done.stderr
    item = {"kind": "task", "body": text, "headers": {"k": text}, "module": None}
    assert emitted(emit) == (json.dumps(item, ensure_ascii=False) + "\n").encode()
