"""Task bodies from a text file (``scalebox task add --file``, ``FILE:`` start tasks), read as
a stream: a file of any size is read, checked and handed on a piece at a time.

No psycopg here: ``scalebox task add --file`` inside run.sh (which only writes the emit buffer)
reads files too, and its start-up time counts.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from scalebox_hpc.errors import InvalidMessageError
from scalebox_hpc.models import MAX_BODY_BYTES, validate_body

CHUNK_BYTES = 1 << 20
"""A file is read and checked this much at a time: memory stays a small multiple of this,
whatever the file's size (a longer line is read whole)."""

_OTHER_BREAKS = re.compile("[\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")
"""Where :meth:`str.splitlines` ends a line besides a newline: a file's lines are its
``splitlines`` lines, as when the file was read whole."""

_SAFE_CHARS = MAX_BODY_BYTES // 4
"""A body of at most this many characters is within MAX_BODY_BYTES whatever it holds (UTF-8
takes at most 4 bytes a character): only longer ones are encoded to be measured."""


@dataclass(frozen=True)
class BodyFile:
    """Task bodies from a UTF-8 text file: one per line that is not blank (lines as
    :meth:`str.splitlines` cuts them). ``strip`` drops the white space around each body
    (``FILE:`` start tasks); else a line is its body as it stands (``task add --file``).
    ``label`` names the file in errors, which also give the line number (counted in newlines,
    as editors and ``grep -n`` count)."""

    path: Path
    strip: bool = False
    label: str = ""
    chunk_bytes: int = CHUNK_BYTES
    """How much is read at a time (tests make it small to cut lines at every place)."""

    @property
    def name(self) -> str:
        """How errors name the file."""
        return self.label or str(self.path)


def read_bodies(source: BodyFile) -> Iterator[tuple[int, str]]:
    """(line number, body) for every body of ``source``, checked like any task body: a line
    that cannot be one raises InvalidMessageError naming the file and the line."""
    for chunk in body_chunks(source):
        yield from chunk


def body_chunks(source: BodyFile) -> Iterator[list[tuple[int, str]]]:
    """The (line number, body) pairs of :func:`read_bodies`, a list per piece of the file read.
    In a piece without NUL and without line breaks but newlines — the common file — a line
    short enough to be within the size limit needs no further check; any other line is cut
    and checked one by one."""
    for start, text in _pieces(source):
        plain = _OTHER_BREAKS.search(text) is None and "\x00" not in text
        out: list[tuple[int, str]] = []
        lineno = start - 1
        for physical in text.split("\n"):
            lineno += 1
            if not physical:
                continue
            if plain and len(physical) <= _SAFE_CHARS:
                if not physical.isspace():  # what str.strip() strips, without a copy
                    out.append((lineno, physical.strip() if source.strip else physical))
                continue
            for part in physical.splitlines():
                body = _checked(source, lineno, part)
                if body is not None:
                    out.append((lineno, body))
        yield out


def _pieces(source: BodyFile) -> Iterator[tuple[int, str]]:
    """The file as (number of its first line, text) pieces that each end at a line break."""
    try:
        fh = source.path.open("rb")
    except OSError as exc:
        raise InvalidMessageError(f"{source.name}: {exc}") from exc
    with fh:
        lineno, offset, carry = 1, 0, b""
        while True:
            try:
                block = fh.read(source.chunk_bytes)
            except OSError as exc:
                raise InvalidMessageError(f"{source.name}: {exc}") from exc
            data = (carry + block) if carry else block
            if block:
                # cut after the last \n or \r: neither byte occurs inside a UTF-8 sequence, and
                # a \r\n cut in two only gives an extra blank line, which is skipped
                cut = max(data.rfind(b"\n"), data.rfind(b"\r")) + 1
                if cut == 0:
                    carry = data
                    continue
                data, carry = data[:cut], data[cut:]
            elif not data:
                return
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                at = lineno + data.count(b"\n", 0, exc.start)
                raise InvalidMessageError(
                    f"{source.name} line {at} is not UTF-8 text ({exc.reason} at byte {offset + exc.start})"
                ) from exc
            yield lineno, text
            if not block:
                return
            lineno += data.count(b"\n")
            offset += len(data)


def _checked(source: BodyFile, lineno: int, line: str) -> str | None:
    """The body a line gives (None for a blank line), checked."""
    if not line or line.isspace():
        return None
    body = line.strip() if source.strip else line
    try:
        return validate_body(body)
    except InvalidMessageError as exc:
        raise InvalidMessageError(f"{source.name} line {lineno}: {exc}") from exc
