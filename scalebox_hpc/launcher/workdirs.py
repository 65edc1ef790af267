"""Where an app's slots work: ``<work root>/app-<id>-<uid prefix>/<module>/<host>-slot<K>``.

App ids restart at 1 in every database (a new site database, the embedded default beside a site
DSN), so ``app-<id>`` alone let the apps 1 of two databases share work dirs: app-primes then
found the other app's gather state in its reused dir and finished with a wrong sum. The app's
uid (unique across databases) names the dir, and a marker file in it holds the whole uid: a
dir that belongs to another app is refused, never reused.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

from scalebox_hpc.errors import SlotError
from scalebox_hpc.runtime.paths import ensure_private, ensure_root

APP_MARKER = ".scalebox-app"
"""The file in an app's work dir holding the uid of the app it belongs to."""


def app_dir(work_root: Path, app_id: int, uid: str) -> Path:
    """The app's work dir under ``work_root`` (not created)."""
    return work_root / f"app-{app_id}-{uid.replace('-', '')[:12]}"


def claim_app_dir(work_root: Path, app_id: int, uid: str) -> Path:
    """Create (or re-enter) the app's work dir and return it; SlotError when its marker names
    another app, UnsafePathError when the root or the app dir is not safe to use (see
    :mod:`scalebox_hpc.runtime.paths`: the app dir is private, 0700, whatever the root)."""
    ensure_root(work_root)
    path = ensure_private(app_dir(work_root, app_id, uid))
    marker = path / APP_MARKER
    if not marker.exists():
        _publish_marker(marker, uid)
    owner = _read_marker(marker)
    if owner != uid:
        raise SlotError(
            f"work dir {path} belongs to app {owner or '(unreadable marker)'}, not to this app ({uid})",
            hint=f"remove {path} if that app is gone, or use another SCALEBOX_WORK_ROOT",
        )
    return path


def _publish_marker(marker: Path, uid: str) -> None:
    """Write the marker whole, then link it into place: the launchers of many nodes start at
    once on a shared work root, and one that read a marker another was still writing took the
    dir for another app's (and ended its slots). ``link`` is atomic (on NFS too) and fails if
    the marker exists: then the first writer's marker stands."""
    tmp = marker.with_name(f"{marker.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(uid + "\n")
        with contextlib.suppress(FileExistsError):
            os.link(tmp, marker)
    finally:
        tmp.unlink(missing_ok=True)


def _read_marker(marker: Path) -> str:
    try:
        fd = os.open(marker, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return ""
    with os.fdopen(fd, "rb") as fh:
        return fh.read(200).decode("utf-8", "replace").strip()
