"""Text that others control (task output, results, bodies) made safe to show on a terminal, and
an error as one line (:func:`error_line`).

Only :mod:`re`: the CLI imports it at start-up, and ``scalebox task add`` starts once per
emitted message."""

from __future__ import annotations

import re

_TERMINAL_ESCAPE = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]"  # CSI: colours, cursor moves, screen clears
    r"|\x1b[\]PX^_][^\x07\x1b\n]*(?:\x07|\x1b\\)"  # OSC, DCS, SOS, PM, APC strings: titles, links, clipboard
    r"|\x1b[ -/]*[0-~]"  # the other escape sequences (charsets, resets), and an unterminated string's opener
)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 but tab and newline, DEL, C1 (8-bit CSI, OSC)


def terminal_safe(text: str) -> str:
    """``text`` without terminal escape sequences or control characters (tab and newline kept):
    what tasks print, or set as results, must not retitle, recolour or rewrite the viewer's terminal."""
    return _CONTROL.sub("", _TERMINAL_ESCAPE.sub("", text))


def error_line(exc: BaseException, *, whole: bool = False, limit: int | None = None) -> str:
    """``exc`` as one line for a message or a record (the class name when it has no text), at most
    ``limit`` characters.

    By default what a database server said: psycopg's ``diag.message_primary`` when it sent one
    (the rest of ``str()`` may be CONTEXT lines, e.g. "PL/pgSQL function ... at RETURN QUERY"
    for an error inside a queue function), else the last line of the text. ``whole``: every
    line of the text, joined, white space folded (a relay's error, which may be any exception)."""
    if whole:
        line = " ".join(str(exc).split())
    else:
        diag = getattr(exc, "diag", None)
        primary = getattr(diag, "message_primary", None) if diag is not None else None
        if isinstance(primary, str) and primary.strip():
            line = " ".join(primary.split())
        else:
            lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
            line = lines[-1] if lines else ""
    return line[:limit] or type(exc).__name__
