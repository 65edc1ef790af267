"""A run's captured stdout/stderr: bounded on disk, read back as their tails.

A run writes its output straight into files in the slot's private dir (no pipe, no thread per
run). A task printing without end would fill the work root (on a cluster: shared scratch), so
while it runs the files are watched: one whose disk use passes ``MAX_OUTPUT_FILE_BYTES`` has its
tail saved in memory and is truncated. The writer's offset does not move, so its next writes
land past a hole (a sparse file: no disk used for it); the tail read at the end joins the saved
tail and what came after the hole.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

MAX_OUTPUT_FILE_BYTES = 256 * 2**20
"""Disk a run's stdout (or stderr) file may use before its head is dropped."""
TAIL_BYTES = 64 * 1024
"""What is kept of each stream (and stored with the execution)."""


@dataclass
class _Stream:
    cut_at: int = 0
    """File size when it was last truncated: bytes before it are gone (or saved)."""
    saved: bytes = b""


@dataclass
class CappedOutputs:
    """The output files of one run; :meth:`check` while it runs, :meth:`tail` after."""

    paths: tuple[Path, ...]
    limit: int = MAX_OUTPUT_FILE_BYTES
    _streams: dict[Path, _Stream] = field(default_factory=dict)

    def check(self) -> None:
        """Truncate every file whose disk use is over the limit, keeping its tail."""
        for path in self.paths:
            try:
                st = os.stat(path, follow_symlinks=False)
            except OSError:
                continue
            if st.st_blocks * 512 <= self.limit:
                continue
            stream = self._streams.setdefault(path, _Stream())
            stream.saved = self._read_tail(path, stream, st.st_size)
            stream.cut_at = st.st_size
            _truncate(path)
            logger.warning("%s: output over %d MiB, only its last %d KiB kept", path, self.limit // 2**20,
                           TAIL_BYTES // 1024)

    def tail(self, path: Path) -> str:
        """The last TAIL_BYTES of the stream as text (invalid UTF-8 replaced), with a note of
        what was dropped."""
        stream = self._streams.get(path)
        if stream is None:
            return _decode(_tail_of(path, 0))
        try:
            size = os.stat(path, follow_symlinks=False).st_size
        except OSError:
            size = 0
        data = self._read_tail(path, stream, size)
        note = f"[scalebox: the output passed {self.limit // 2**20} MiB on disk; only its end was kept]\n"
        return note + _decode(data)

    def _read_tail(self, path: Path, stream: _Stream, size: int) -> bytes:
        """The saved tail joined with what was written after the last truncation, last TAIL_BYTES."""
        # a writer in append mode starts again at 0 after the truncation, others past the hole
        recent = _tail_of(path, stream.cut_at if size >= stream.cut_at else 0)
        return (stream.saved + recent)[-TAIL_BYTES:]


def _tail_of(path: Path, start: int) -> bytes:
    """The last TAIL_BYTES of ``path`` from offset ``start`` on (b"" when absent, empty or not a
    regular file). An empty file (most runs print nothing on one of the two) costs one lstat:
    every system call here lets the slot's thread give up the GIL, and a node runs 32 slots
    (measured 9 calls a stream before: open, isatty, 3 seeks, read, close)."""
    try:
        st = os.lstat(path)
    except OSError:
        return b""
    if st.st_size <= start or not stat.S_ISREG(st.st_mode):
        return b""
    try:  # O_NOFOLLOW / O_NONBLOCK: the name may have been swapped since the lstat
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return b""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return b""
        offset = max(start, st.st_size - TAIL_BYTES)
        return os.pread(fd, TAIL_BYTES, offset)
    finally:
        os.close(fd)


def _decode(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")


def _truncate(path: Path) -> None:
    """Empty ``path`` if it is still a regular file: never through a symlink swapped in since the
    lstat (``os.truncate`` would follow it), never blocking on a FIFO."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)
