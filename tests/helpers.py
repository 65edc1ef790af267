"""Small builders for tests: pipeline directories with scripts."""

from __future__ import annotations

import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil


def write_app(root: Path, yaml_text: str, scripts: dict[str, str]) -> Path:
    """Write app.yaml and module scripts ({"calc/run.sh": "..."}, made executable); returns app.yaml."""
    root.mkdir(parents=True, exist_ok=True)
    app = root / "app.yaml"
    app.write_text(textwrap.dedent(yaml_text))
    for rel, body in scripts.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/usr/bin/env bash\nset -euo pipefail\n" + textwrap.dedent(body))
        path.chmod(0o755)
    return app


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "the condition",
               every: float = 0.05) -> Any:
    """Poll ``predicate`` every ``every`` seconds until it returns something truthy, and return
    that; after ``timeout`` seconds an AssertionError says what was waited for. The one polling
    loop of the suite (a test states its condition, not its timing)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


def running(pid: int) -> bool:
    """Alive and not a zombie (an init that reaps late, as in a container, keeps zombies around)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
