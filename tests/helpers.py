"""Small builders for tests: pipeline directories with scripts."""

from __future__ import annotations

import textwrap
from pathlib import Path


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
