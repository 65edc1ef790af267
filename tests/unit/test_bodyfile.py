"""Property tests: a body file (``task add --file``, ``FILE:`` start tasks) read as a stream
gives exactly the bodies the file read whole gives (``read_text().splitlines()``, the blank
lines dropped), whatever bytes it holds and wherever the pieces are cut; a line that cannot be a
body fails with its line number, as does bad UTF-8."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scalebox_hpc.db.bodyfile import BodyFile, body_chunks, read_bodies
from scalebox_hpc.errors import InvalidMessageError
from scalebox_hpc.models import MAX_BODY_BYTES, validate_body

SETTINGS = settings(max_examples=int(os.environ.get("BODYFILE_EXAMPLES", "300")), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])

# Every line break str.splitlines knows (in UTF-8), blanks, NUL, bad and cut UTF-8, a BOM.
FRAGMENTS = [
    b"\n", b"\r", b"\r\n", b"\x0b", b"\x0c", b"\x1c", b"\x1d", b"\x1e", b"\xc2\x85", b"\xe2\x80\xa8",
    b"\xe2\x80\xa9", b" ", b"\t", b"\xc2\xa0", b"\xe3\x80\x80", b"\x00", b"\xff", b"\xed\xa0\x80", b"\xc3",
    b"\xef\xbb\xbf", b"\\", b"\\N", b"\\.", b"a", b"body", b"\xc3\xa9", b"\xf0\x9f\x98\x80", b"$(x)", b"'\"",
]
file_bytes = st.one_of(
    st.binary(max_size=200),
    st.lists(st.sampled_from(FRAGMENTS), max_size=80).map(b"".join),
)


def reference(data: bytes, strip: bool) -> list[str]:
    """What the old, read-it-whole code gave (or raised)."""
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise InvalidMessageError("not UTF-8") from exc
    bodies = [ln.strip() if strip else ln for ln in lines if ln.strip()]
    return [validate_body(b) for b in bodies]


def _file(data: bytes) -> Path:
    fd, name = tempfile.mkstemp(prefix="sbx-bodies-")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return Path(name)


@SETTINGS
@given(data=file_bytes, strip=st.booleans(), chunk=st.integers(min_value=1, max_value=64))
def test_streamed_bodies_equal_the_file_read_whole(data: bytes, strip: bool, chunk: int) -> None:
    path = _file(data)
    try:
        source = BodyFile(path, strip=strip, chunk_bytes=chunk)
        try:
            expected = reference(data, strip)
        except InvalidMessageError:
            with pytest.raises(InvalidMessageError, match=r"line \d+"):
                list(read_bodies(source))
            return
        got = list(read_bodies(source))
        assert [b for _, b in got] == expected
        physical = data.split(b"\n")
        for line, body in got:  # the line number names the (newline-counted) line holding it
            assert body.encode("utf-8") in physical[line - 1]
        assert [b for c in body_chunks(source) for _, b in c] == expected
    finally:
        path.unlink()


@SETTINGS
@given(data=file_bytes)
def test_the_error_names_the_line_of_the_first_bad_byte(data: bytes) -> None:
    try:
        data.decode("utf-8")
        return
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        where = f"line {line} is not UTF-8 text ({exc.reason} at byte {exc.start})"
    path = _file(data)
    try:
        with pytest.raises(InvalidMessageError) as caught:
            list(read_bodies(BodyFile(path, label="f", chunk_bytes=7)))
        # a NUL or oversized body on an earlier line is found first; else the bad byte
        assert str(caught.value).startswith("f line ")
        if "is not UTF-8" in str(caught.value):
            assert str(caught.value) == f"f {where}"
    finally:
        path.unlink()


def test_errors_name_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bodies.txt"
    path.write_bytes(b"a\n\n  \nb\x00c\n")
    with pytest.raises(InvalidMessageError, match=r"^bodies.txt line 4: task body contains a NUL byte$"):
        list(read_bodies(BodyFile(path, label="bodies.txt")))
    path.write_bytes(b"ok\n" + b"x" * (MAX_BODY_BYTES + 1) + b"\n")
    with pytest.raises(InvalidMessageError, match=r"line 2: task body is \d+ bytes"):
        list(read_bodies(BodyFile(path)))
    with pytest.raises(InvalidMessageError, match="No such file"):
        list(read_bodies(BodyFile(tmp_path / "missing")))


def test_a_body_at_the_size_limit_passes_and_lines_keep_their_spaces(tmp_path: Path) -> None:
    path = tmp_path / "b.txt"
    big = "é" * (MAX_BODY_BYTES // 2)  # two bytes each: MAX_BODY_BYTES - 1 bytes
    path.write_text(f"  spaced  \r\n{big}\n\ttab\\slash\n", encoding="utf-8")
    assert list(read_bodies(BodyFile(path))) == [(1, "  spaced  "), (2, big), (3, "\ttab\\slash")]
    assert [b for _, b in read_bodies(BodyFile(path, strip=True))] == ["spaced", big, "tab\\slash"]


def test_pieces_stay_small_whatever_the_file_size(tmp_path: Path) -> None:
    path = tmp_path / "many.txt"
    path.write_text("".join(f"body-{i}\n" for i in range(20_000)), encoding="utf-8")
    chunks = list(body_chunks(BodyFile(path, chunk_bytes=4096)))
    assert len(chunks) > 20
    assert max(len(c) for c in chunks) < 4096 // 5
    assert [line for c in chunks for line, _ in c] == list(range(1, 20_001))
