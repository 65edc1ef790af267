"""The live tail a node's heartbeat carries of a running task's output (issue 14): terminal-safe
byte for byte, valid UTF-8, and followed by offset without printing anything twice."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from scalebox_hpc.launcher.livetail import LIVE_TAIL_BYTES, new_text, sanitize, stream_tail
from scalebox_hpc.launcher.slot import script_said


@given(st.binary(max_size=600))
def test_sanitize_keeps_the_length_and_leaves_nothing_that_steers_a_terminal(data: bytes) -> None:
    text = sanitize(data)
    assert len(text.encode("utf-8")) == len(data)  # offsets into the text are offsets into the file
    assert not any((ord(c) < 0x20 and c not in "\t\n") or 0x7F <= ord(c) <= 0x9F for c in text)
    assert "\x00" not in text  # storable in PostgreSQL text and jsonb


def test_sanitize_keeps_text_and_marks_what_is_not() -> None:
    assert sanitize("héllo\tworld\n".encode()) == "héllo\tworld\n"
    assert sanitize(b"\x1b[31mred\r\xff\xc2\x9b") == "?[31mred\n?\u00b7"


def test_a_tail_starts_and_ends_on_whole_characters(tmp_path: Path) -> None:
    path = tmp_path / "run.out"
    path.write_bytes(b"x" * LIVE_TAIL_BYTES + "é".encode() * 10 + "€".encode()[:2])  # a character half written
    tail = stream_tail(path)
    assert tail is not None
    raw = tail["text"].encode()
    assert tail["end"] == path.stat().st_size - 2 and raw.endswith("é".encode() * 10)
    assert len(raw) <= LIVE_TAIL_BYTES and "\ufffd" not in tail["text"] and "?" not in tail["text"]
    assert stream_tail(tmp_path / "absent") is None


_WRITES = st.binary(max_size=700).map(lambda b: b.replace(b"\x00", b"\x01"))  # NULs: a truncated file's hole


@settings(max_examples=60, deadline=None)
@given(st.lists(_WRITES, min_size=1, max_size=12))
def test_a_follower_of_growing_output_prints_each_byte_once(pieces: list[bytes]) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "run.out"
        path.write_bytes(b"")
        printed, shown = 0, ""
        for piece in pieces:  # less than a tail between two looks: nothing is missed
            with open(path, "ab") as fh:
                fh.write(piece)
            new = new_text(stream_tail(path), printed)
            assert new.skipped == 0
            shown, printed = shown + new.text, new.printed
        data = path.read_bytes()
        tail = stream_tail(path)
        assert tail is not None and printed == tail["end"] and len(data) - printed <= 3
        # what was shown is the file's text up to its last whole character, once, in order
        assert shown == sanitize(data[:printed])


def test_a_follower_says_what_it_missed_and_when_the_stream_began_anew() -> None:
    assert new_text({"end": 10_000, "text": "end\n"}, 0) == ("end\n", 10_000, 9_996)
    assert new_text({"end": 4, "text": "new\n"}, 10_000) == ("new\n", 4, -1)
    assert new_text({"end": 8, "text": "abcdefgh"}, 5) == ("fgh", 8, 0)
    assert new_text(None, 7) == ("", 7, 0)


def test_a_scripts_last_stderr_lines_are_one_bounded_safe_line(tmp_path: Path) -> None:
    err = tmp_path / "setup.err"
    err.write_bytes(b"first\n\n  loading \x1b]0;pwned\x07 the model  \nmodel.bin: gone\n\n")
    assert script_said(err) == "loading ?]0;pwned? the model / model.bin: gone"
    err.write_text("x" * 5000 + "\n")
    said = script_said(err, limit=50)
    assert len(said) == 50 and said.startswith("...")
    assert script_said(tmp_path / "absent") == ""
