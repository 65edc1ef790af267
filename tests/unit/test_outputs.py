"""A run's output files stay bounded on disk; their tails survive the truncation."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from scalebox_hpc.launcher.outputs import TAIL_BYTES, CappedOutputs


def disk_use(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_a_run_printing_without_end_stays_within_the_cap_and_keeps_its_tail(tmp_path: Path) -> None:
    out, err = tmp_path / "run.out", tmp_path / "run.err"
    cap = CappedOutputs((out, err), limit=1 * 2**20)
    script = "i=0; while [ $i -lt 400 ]; do head -c 16384 /dev/zero | tr '\\0' x; i=$((i+1)); done; echo THE-END"
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = subprocess.Popen(["sh", "-c", script], stdout=fo, stderr=fe)
        peak = 0
        while proc.poll() is None:
            cap.check()
            peak = max(peak, disk_use(out))
        cap.check()
    assert proc.returncode == 0
    assert os.stat(out).st_size > 6 * 2**20  # 6.5 MB written in all ...
    assert disk_use(out) <= 2 * 2**20 and peak <= 4 * 2**20  # ... but never much more than the cap on disk
    tail = cap.tail(out)
    assert tail.startswith("[scalebox: the output passed 1 MiB on disk")
    assert tail.endswith("xxxxTHE-END\n") and "\x00" not in tail
    assert len(tail.encode()) <= TAIL_BYTES + 200
    assert cap.tail(err) == ""


def test_small_output_is_read_as_it_is(tmp_path: Path) -> None:
    out = tmp_path / "run.out"
    out.write_bytes(b"hello \xff world\n")
    cap = CappedOutputs((out,))
    cap.check()
    assert cap.tail(out) == "hello \ufffd world\n"
    assert cap.tail(tmp_path / "absent") == ""


def test_a_tail_is_the_last_bytes_and_never_read_through_a_link_or_from_a_fifo(tmp_path: Path) -> None:
    """What a run leaves in place of its output file is never followed or opened blocking: a
    symlink (a task replacing its own stdout file) gives nothing, and so does a FIFO."""
    out = tmp_path / "run.out"
    out.write_bytes(b"a" * TAIL_BYTES + b"END\n")
    cap = CappedOutputs((out,))
    assert cap.tail(out) == "a" * (TAIL_BYTES - 4) + "END\n"  # the last TAIL_BYTES, whole lines or not
    empty = tmp_path / "empty.out"
    empty.touch()
    assert cap.tail(empty) == ""
    secret = tmp_path / "secret"
    secret.write_text("not the run's\n")
    link = tmp_path / "link.out"
    link.symlink_to(secret)
    assert cap.tail(link) == ""
    fifo = tmp_path / "fifo.out"
    os.mkfifo(fifo)
    assert cap.tail(fifo) == ""  # returns at once: nothing writes to it
