"""The live tail of a running task's output, as the node's heartbeat carries it to the database
(``sbx_slots.live_output``) and ``scalebox task show --follow`` prints it.

Each stream is sent as ``{"end": E, "text": T}``: ``E`` is the file's size when read, ``T`` its
last bytes (at most LIVE_TAIL_BYTES) made terminal-safe *byte for byte*: every control
character, and every byte that is not UTF-8, is replaced by a mark of the same encoded length.
So ``T`` encodes to exactly the bytes ``[E - len(T.encode()), E)`` of the file, and a follower
that printed up to offset P prints ``T.encode()[P - start:]``: only what is new, without
offsets into the sanitised text ever drifting from the file's.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from scalebox_hpc.runtime.paths import open_regular

LIVE_TAIL_BYTES = 2048
"""What one beat carries of each stream of a running task (stdout and stderr each)."""

_MARKS = {1: "?", 2: "\u00b7", 3: "\ufffd", 4: "\ufffd?"}
"""A visible mark for a replaced character, by the length of its UTF-8 encoding."""


def _is_control(code: int) -> bool:
    """C0 but tab and newline, DEL, C1 (8-bit CSI, OSC): what could steer a terminal."""
    return (code < 0x20 and code not in (0x09, 0x0A)) or 0x7F <= code <= 0x9F


def sanitize(data: bytes) -> str:
    """``data`` as terminal-safe, valid UTF-8 text of exactly ``len(data)`` encoded bytes: a
    carriage return becomes a newline (progress bars stay readable), other control characters
    and bytes that are not UTF-8 become marks of the same length."""
    out = []
    for ch in data.decode("utf-8", "surrogateescape"):
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # one byte that is not UTF-8
            out.append("?")
        elif code == 0x0D:
            out.append("\n")
        elif _is_control(code):
            out.append(_MARKS[len(ch.encode("utf-8"))])
        else:
            out.append(ch)
    return "".join(out)


def _aligned(data: bytes, at_start: bool) -> tuple[int, int]:
    """(skip, keep): the bytes to drop at the front (the rest of a character cut by the read,
    the NULs of a truncated file's hole) and where to stop (before a character still being
    written)."""
    skip = 0
    if not at_start:
        while skip < min(3, len(data)) and 0x80 <= data[skip] <= 0xBF:
            skip += 1
    while skip < len(data) and data[skip] == 0:
        skip += 1
    keep = len(data)
    for back in range(1, min(4, len(data) - skip) + 1):
        byte = data[keep - back]
        if byte < 0x80:
            break
        if byte >= 0xC0:  # the lead byte of the last character: is it whole?
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            if back < need:
                keep -= back
            break
    return skip, keep


def stream_tail(path: Path, limit: int = LIVE_TAIL_BYTES) -> dict[str, Any] | None:
    """``{"end", "text"}`` for the last ``limit`` bytes of ``path``; None when it cannot be read."""
    try:
        with open_regular(path) as fh:  # in the private dir: no symlink followed, no FIFO waited on
            size = os.fstat(fh.fileno()).st_size
            start = max(0, size - limit)
            fh.seek(start)
            data = fh.read(limit)
    except OSError:
        return None
    skip, keep = _aligned(data, start == 0)
    return {"end": start + keep, "text": sanitize(data[skip:keep])}


def live_output(task_id: int, stdout: Path, stderr: Path) -> dict[str, Any]:
    """What one beat carries for a running task: the tails of its two streams."""
    return {"task_id": task_id, "stdout": stream_tail(stdout), "stderr": stream_tail(stderr)}


class NewText(NamedTuple):
    """What a follower prints of one snapshot of a stream."""

    text: str
    printed: int
    """The stream offset printed up to, after this."""
    skipped: int
    """Bytes that came and went between two snapshots (not shown); -1: the stream began anew."""


def new_text(stream: Mapping[str, Any] | None, printed: int) -> NewText:
    """The part of a stream's snapshot (:func:`stream_tail`) after offset ``printed``."""
    if not stream:
        return NewText("", printed, 0)
    end, text = int(stream.get("end", 0)), str(stream.get("text", ""))
    raw = text.encode("utf-8")
    start = end - len(raw)
    if end < printed:  # the file was cut and is written from its start again
        return NewText(text, end, -1)
    if printed >= end:
        return NewText("", printed, 0)
    if printed < start:
        return NewText(text, end, start - printed)
    return NewText(raw[printed - start:].decode("utf-8", "replace"), end, 0)
