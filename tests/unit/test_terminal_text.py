"""Task-controlled text shown by the CLI (audit F24): no rich markup, no terminal escapes."""

from __future__ import annotations

import random
from datetime import UTC, datetime

import pytest

from scalebox_hpc.cli import _one_line, _print_status, terminal_safe

UNSAFE = {chr(c) for c in range(0x20) if chr(c) not in "\t\n"} | {chr(0x7F)} | {chr(c) for c in range(0x80, 0xA0)}


@pytest.mark.parametrize(("raw", "shown"), [
    ("plain text\twith tab\nand newline", "plain text\twith tab\nand newline"),
    ("\x1b]0;pwned\x07title", "title"),  # OSC: set the window title (BEL-terminated)
    ("\x1b]0;pwned\x1b\\title", "title"),  # ... ST-terminated
    ("\x1b]8;;http://evil/\x1b\\link\x1b]8;;\x1b\\", "link"),  # OSC 8 hyperlink
    ("\x1b]52;c;cm0gLXJmIH4=\x07", ""),  # OSC 52: write the clipboard
    ("\x1b[31mred\x1b[0m \x1b[2J\x1b[H\x1b[?25l", "red "),  # colours, clear screen, home, hide cursor
    ("\x1bPq#0;2;0;0;0\x1b\\dcs", "dcs"),  # DCS (sixel)
    ("\x1bc\x1b(0reset", "reset"),  # RIS, charset switch
    ("\x1b]0;unterminated title", "0;unterminated title"),  # opener dropped, text stays visible
    ("a\rb\x08c\x00d\x7fe\x0bf\x0cg", "abcdefg"),
    ("\x9b31m8-bit\x9d0;t\x9c", "31m8-bit0;t"),  # C1 controls (8-bit CSI, OSC, ST) dropped
    ("ünïcödé ✓ [/] [bold]x[/bold] :smile:", "ünïcödé ✓ [/] [bold]x[/bold] :smile:"),
    ("lone escape at the end\x1b", "lone escape at the end"),
    ("\x1b\x1b[31mdouble", "double"),
])
def test_terminal_safe(raw: str, shown: str) -> None:
    assert terminal_safe(raw) == shown


def test_terminal_safe_leaves_no_control_characters() -> None:
    rng = random.Random(24)
    alphabet = "ab[];\\\x1b\x07\x9b\x9d\x9c\r\n\t\x00 0123?P^_X()"
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert not UNSAFE & set(terminal_safe(text)), repr(text)


def test_one_line() -> None:
    assert _one_line("a\nb\tc\x1b[1m") == "a b c"


def test_status_table_shows_markup_literally(capsys: pytest.CaptureFixture[str]) -> None:
    app = {"id": 1, "name": "[bold]app", "status": "FINISHED", "result": "[/] result \x1b]0;pwned\x07",
           "finished_at": datetime.now(UTC)}
    rows = [{"module": "m", "total": 1, "ready": 0, "running": 0, "ok": 1, "failed": 0, "per_minute": 0,
             "jobs": ["[/]:RUNNING"]}]
    _print_status(app, rows, clear=False)
    out = capsys.readouterr().out
    assert "[bold]app" in out and "[/] result" in out and "[/]:RUNNING" in out
    assert "\x1b]" not in out and "pwned" not in out
