"""Built-in flow-control gates checked before every claim: free disk space and directory quotas,
so a stage stops pulling work while its disk is full (Scalebox's disk flow control)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from scalebox_hpc.pipeline import ModuleArguments

GB = 1e9


def dir_size(path: Path) -> int:
    """Bytes under ``path`` (files only; links not followed; vanishing entries ignored)."""
    total = 0
    stack = [path]
    while stack:
        try:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    try:
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(Path(entry.path))
                        elif entry.is_file(follow_symlinks=False):
                            total += entry.stat(follow_symlinks=False).st_size
                    except OSError:
                        continue
        except OSError:
            continue
    return total


def closed_gate(args: ModuleArguments, work_dir: Path) -> str | None:
    """Why a claim must wait now, or None when every gate is open."""
    if args.free_space_gb is not None:
        free = shutil.disk_usage(work_dir).free / GB
        if free < args.free_space_gb:
            return f"free space {free:.2f} GB < free_space_gb {args.free_space_gb}"
    for directory, limit in (args.dir_limit_gb or {}).items():
        used = dir_size(Path(directory)) / GB
        if used >= limit:
            return f"{directory} holds {used:.2f} GB >= dir_limit_gb {limit}"
    return None
