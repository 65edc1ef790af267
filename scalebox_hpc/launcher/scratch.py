"""The node-local scratch as the scratch index sees it: keys are paths relative to its root."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

logger = logging.getLogger(__name__)


def scan(root: Path) -> list[tuple[str, int]]:
    """Every regular file under ``root``: (relative path, size). A missing root holds nothing."""
    found: list[tuple[str, int]] = []
    for dirpath, _dirs, files in os.walk(root, onerror=lambda exc: logger.warning("scratch scan: %s", exc)):
        for name in files:
            path = Path(dirpath) / name
            try:
                found.append((str(path.relative_to(root)), path.stat().st_size))
            except OSError:  # removed while we walked
                continue
    return found


def keys(paths: Iterable[str], root: Path, work_dir: Path) -> list[tuple[str, int]]:
    """The files among ``paths`` (absolute, or relative to ``work_dir``) that lie in ``root``,
    as (key, size), each key once (a file listed twice, or by two spellings, would make one
    INSERT update a row twice); files elsewhere are not in the scratch and are left out."""
    root = root.resolve()
    out: dict[str, int] = {}
    for text in paths:
        path = Path(text)
        path = (path if path.is_absolute() else work_dir / path).resolve()
        if not path.is_relative_to(root):
            continue
        try:
            size = path.stat().st_size
        except OSError:
            size = 0
        out[str(path.relative_to(root))] = size
    return list(out.items())
