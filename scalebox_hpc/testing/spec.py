"""App specs for tests, without pipeline files."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from scalebox_hpc.errors import PipelineError
from scalebox_hpc.pipeline import AppSpec


def app_spec(data: Mapping[str, Any], app_dir: str | Path = "/nonexistent/scalebox-app") -> AppSpec:
    """An AppSpec from a mapping in the pipeline file's shape, without files: ``modules`` is a
    mapping of name to settings (or a list with names), ``code_path`` defaults to
    ``<app_dir>/<name>``. Sink names are checked; scripts are not (the queue never runs them)."""
    raw = dict(data)
    modules = raw.get("modules") or {}
    listed = [{**(body or {}), "name": name} for name, body in modules.items()] if isinstance(modules, Mapping) \
        else [dict(m) for m in modules]
    root = Path(app_dir)
    for body in listed:
        body.setdefault("code_path", str(root / str(body["name"])))
    spec = AppSpec.model_validate({**raw, "modules": listed, "app_dir": root})
    names = {m.name for m in spec.modules}
    for m in spec.modules:
        for sink in m.sink_modules:
            if sink not in names:
                raise PipelineError(f"unknown module {sink!r}", key=f"modules.{m.name}.sink_modules")
    return spec


