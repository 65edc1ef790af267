"""Text that others control (task output, results, bodies) made safe to show on a terminal.

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
