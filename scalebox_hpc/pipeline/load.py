"""From a pipeline file to a validated :class:`AppSpec`: module forms, code paths, clusters, and the
checks that need the whole app or the filesystem (:func:`load_pipeline`)."""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import yaml
from pydantic import ValidationError

from scalebox_hpc.errors import PipelineError
from scalebox_hpc.pipeline.remotes import module_remote
from scalebox_hpc.pipeline.spec import AppSpec, ModuleSpec
from scalebox_hpc.pipeline.variables import _load_variables
from scalebox_hpc.pipeline.yaml_lines import (
    _compose,
    _Key,
    _mark_line,
    _Path,
    _Reader,
    _yaml_message,
    did_you_mean,
)

logger = logging.getLogger(__name__)

STANDARD_PREFIX = "scalebox:"
STANDARD_MODULES = Path(__file__).resolve().parent.parent / "modules"
"""The standard modules (``code_path: scalebox:list-dir``), shipped inside the package."""


def _rekey(lines: dict[_Path, int], old: _Path, new: _Path) -> None:
    size = len(old)
    for path in [p for p in lines if p[:size] == old]:
        lines[new + path[size:]] = lines.pop(path)


class _Loader:
    """One load: the data, its line map and the checks that need both."""

    def __init__(self, reader: _Reader, data: dict[str, Any], app_dir: Path) -> None:
        self.reader = reader
        self.lines = reader.lines
        self.data = data
        self.app_dir = app_dir
        self.names: list[str] = []

    def line(self, path: _Path) -> int | None:
        """The line of ``path`` or of its nearest recorded ancestor."""
        for size in range(len(path), -1, -1):
            if path[:size] in self.lines:
                return self.lines[path[:size]]
        return None

    def error(self, message: str, path: _Path) -> PipelineError:
        return self.reader.error(message, path, self.line(path))

    def modules(self) -> Any:
        """The modules as a list of dicts with ``name``, from the mapping or the list form
        (None when absent, for pydantic to report)."""
        raw = self.data.get("modules")
        if isinstance(raw, dict):
            modules = [self._named(name, body) for name, body in raw.items()]
        elif isinstance(raw, list):
            modules = [self._listed(index, item) for index, item in enumerate(raw)]
        elif raw is not None:
            raise self.error("modules must be a mapping of module name to settings (or a list)", ("modules",))
        else:
            return raw
        self.names = [m["name"] for m in modules]
        return modules

    def _named(self, name: str, body: Any) -> dict[str, Any]:
        path: _Path = ("modules", name)
        if body is None:
            body = {}
        if not isinstance(body, dict):
            raise self.error("a module must be a mapping of its settings (or empty)", path)
        if "name" in body and str(body["name"]) != name:
            raise self.error(f"name {body['name']!r} differs from the module key {name!r}", (*path, "name"))
        return {**body, "name": name}

    def _listed(self, index: int, item: Any) -> dict[str, Any]:
        path: _Path = ("modules", index)
        if not isinstance(item, dict):
            raise self.error("a module must be a mapping with a name", path)
        name = item.get("name")
        if not isinstance(name, str | int) or isinstance(name, bool) or not str(name):
            raise self.error("a module in a list needs a name", path)
        name = str(name)
        if name in self.names:
            raise self.error(f"duplicate module name {name!r}; first at line {self.lines[('modules', name)]}", path)
        self.names.append(name)
        _rekey(self.lines, path, ("modules", name))
        return {**item, "name": name}

    def resolve(self, module: dict[str, Any]) -> dict[str, Any]:
        """Absolute code_path (default: ``<app dir>/<name>/``, else the app dir if it holds run.sh
        or the module names a handler);
        ``schedule_mode: HEAD`` means one slot."""
        name = module["name"]
        code_path = module.get("code_path")
        if isinstance(code_path, str) and code_path.startswith(STANDARD_PREFIX):
            module["code_path"] = self._standard(name, code_path[len(STANDARD_PREFIX):])
        elif isinstance(code_path, str):
            module["code_path"] = Path(os.path.normpath(self.app_dir / code_path))
        elif code_path is None:
            own = self.app_dir / name
            # a one-file app: run.sh (or the handler's file) next to app.yaml
            use_app_dir = not own.is_dir() and ((self.app_dir / "run.sh").is_file() or bool(module.get("handler")))
            module["code_path"] = self.app_dir if use_app_dir else own
        defaults, own = self.data.get("slurm"), module.get("slurm")
        base, access = self._cluster(module)
        if own is None or isinstance(own, dict):
            # app defaults < the cluster's defaults < the module's own keys; then how to reach the cluster
            app = defaults if isinstance(defaults, dict) else {}
            if app or base or access:
                module["slurm"] = {**app, **base, **(own or {}), **access}
        mode = module.get("schedule_mode")
        if isinstance(mode, str) and mode.strip().upper() == "HEAD":
            if "slots" in module:
                logger.warning("module %s: schedule_mode HEAD ignores slots %s", name, module["slots"])
            module["slots"] = [{"host_regex": ".*", "count": 1}]
            own_slurm = module.get("slurm")
            slurm: dict[str, Any] = own_slurm if isinstance(own_slurm, dict) else {}
            # one slot in the whole app: one stage job on one node
            module["slurm"] = {**slurm, "nodes": 1, "slots_per_node": 1, "max_jobs": 1,
                               "min_jobs": min(_int_or(slurm.get("min_jobs"), 0), 1)}
        return module

    def _cluster(self, module: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The module's cluster (its ``cluster:``, else the app's when declared under ``clusters:``):
        (that cluster's ``slurm:`` defaults, how to reach it: ``cluster``, ``submit_via``, scratch and
        data root for the module's ``slurm``). Both empty without a declared cluster: the app's
        ``cluster`` alone only labels the app (its Slurm call budget), as before."""
        clusters = self.data.get("clusters")
        declared = clusters if isinstance(clusters, dict) else {}
        name = module.get("cluster")
        if name is None:
            name = self.data.get("cluster")
            if name is None or str(name) not in declared:
                return {}, {}
        elif str(name) not in declared:
            raise self.error(f"unknown cluster {name!r}{did_you_mean(str(name), list(declared))}; declare it "
                             "under clusters: (clusters: {NAME: {slurm: {...}}})",
                             ("modules", module["name"], "cluster"))
        cluster = declared[str(name)]
        if not isinstance(cluster, dict):
            return {}, {}  # pydantic reports the bad clusters entry
        base = cluster.get("slurm")
        return (base if isinstance(base, dict) else {}), {
            "cluster": str(name), "submit_via": cluster.get("submit_via") or [],
            "local_scratch": cluster.get("local_scratch"), "data_root": cluster.get("data_root")}

    def _standard(self, module: str, name: str) -> Path:
        """``code_path: scalebox:NAME``: the standard module shipped in ``scalebox_hpc/modules/NAME``."""
        available = sorted(p.name for p in STANDARD_MODULES.iterdir() if (p / "run.sh").is_file())
        if name not in available:
            raise self.error(f"unknown standard module {STANDARD_PREFIX}{name}{did_you_mean(name, available)};"
                             f" available: {', '.join(available)}", ("modules", module, "code_path"))
        return STANDARD_MODULES / name

    def from_validation(self, exc: ValidationError) -> PipelineError:
        """The first (by line) pydantic error, located in the file."""
        errors = exc.errors(include_url=False)
        located = sorted(((self._locate(err), err) for err in errors), key=lambda pair: pair[0][1] or 0)
        (path, line), err = located[0]
        message = _pydantic_message(err)
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more)"
        return self.reader.error(message, path, line)

    def _locate(self, err: Any) -> tuple[_Path, int | None]:
        loc: list[_Key] = list(err["loc"])
        if len(loc) > 1 and loc[0] == "modules" and isinstance(loc[1], int) and loc[1] < len(self.names):
            loc[1] = self.names[loc[1]]
        path = tuple(loc)
        for size in range(len(path), -1, -1):
            if path[:size] in self.lines:
                shown = path if err["type"] == "missing" and size == len(path) - 1 else path[:size]
                return shown, self.lines[path[:size]]
        return path, None

    def check(self, spec: AppSpec) -> None:
        """Checks that need the whole app or the filesystem: sink names and run.sh."""
        names = [m.name for m in spec.modules]
        for module in spec.modules:
            try:  # REMOTE_SERVER + APP_ID: the sinks not in this file are a remote app's modules
                remote = module_remote(module.environments)
            except ValueError as exc:
                env: _Path = ("modules", module.name, "environments")
                raise self.reader.error(str(exc), env, self.line(env)) from None
            if module.remote is not None:  # the native form: remote: NAME of remotes:
                if module.remote not in spec.remotes:
                    key: _Path = ("modules", module.name, "remote")
                    raise self.reader.error(f"unknown remote {module.remote!r}"
                                            f"{did_you_mean(module.remote, list(spec.remotes))} "
                                            "(declare it under remotes: {NAME: {dsn: ..., app_id: N}})",
                                            key, self.line(key))
                remote = remote or spec.module_remote(module)
            for index, sink in enumerate(module.sink_modules):
                if sink not in names and remote is None:
                    path: _Path = ("modules", module.name, "sink_modules")
                    raise self.reader.error(f"unknown module {sink!r}{did_you_mean(sink, names)}", path,
                                            self.line((*path, index)))
        try:
            spec.remote_sinks()
        except ValueError as exc:
            raise self.reader.error(str(exc), ("modules",), self.line(("modules",))) from None
        for module in spec.modules:
            if module.mpi.mode == "collective":  # a Python handler instead of run.sh
                continue
            if module.handler is not None:  # an in-slot Python handler instead of run.sh
                self._check_handler(module)
                continue
            if module.script("run.sh") is None:
                where: _Path = ("modules", module.name, "code_path")
                raise self.reader.error(f"no run.sh in {module.code_path}", ("modules", module.name),
                                        self.line(where))

    def _check_handler(self, module: ModuleSpec) -> None:
        """A ``handler``: its file exists under code_path (or its module can be found), and
        the module runs bare (the worker is the launcher's own Python)."""
        key: _Path = ("modules", module.name, "handler")
        where = cast(str, module.handler).rpartition(":")[0]
        if module.base_image is not None or module.arguments.runtime not in (None, "local"):
            raise self.error("handlers run bare (no base_image, runtime local) in this release; "
                             "use run.sh for a containerised module", key)
        if where.endswith(".py"):
            if not (module.code_path / where).is_file():
                raise self.error(f"no handler file {where} in {module.code_path}", key)
            return
        top = where.partition(".")[0]
        if (module.code_path / f"{top}.py").is_file() or (module.code_path / top).is_dir():
            return  # the worker appends code_path to sys.path
        try:  # finds the module without running it (its parent packages are imported)
            found = importlib.util.find_spec(where)
        except (ImportError, ValueError) as exc:
            raise self.error(f"handler module {where!r} cannot be found: {exc}", key) from None
        if found is None:
            raise self.error(f"handler module {where!r} is not importable (not on sys.path)", key)


def _int_or(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _pydantic_message(err: Any) -> str:
    kind = err["type"]
    message = str(err["msg"])
    if kind == "missing":
        return "missing required key"
    if kind == "extra_forbidden":
        return "unknown key"
    for prefix in ("Value error, ", "Assertion failed, "):
        if message.startswith(prefix):
            return message[len(prefix):]
    value = err.get("input")
    if value is None or isinstance(value, str | int | float | bool):
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        message += f" (got {shown})"
    return message


def load_pipeline(
    path: str | Path, env_files: Sequence[str | Path] = (), environ: Mapping[str, str] | None = None
) -> AppSpec:
    """Load, substitute and validate a pipeline file; every problem is a PipelineError naming
    ``file:line: key``. ``env_files`` (``-e``) override ``scalebox.env`` next to the file;
    ``environ`` (default ``os.environ``) overrides both."""
    file = Path(path)
    if file.is_dir():
        file = file / "app.yaml"
    display = str(file)
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineError(f"cannot read pipeline file: {exc}", file=display) from exc
    return _load_text(text, display, Path(os.path.abspath(file)).parent, env_files, environ, located=True)


DATA_SOURCE = "<pipeline data>"
"""How errors name a pipeline given as a mapping (:func:`load_pipeline_data`)."""


def load_pipeline_data(
    data: Mapping[str, Any], *, app_dir: str | Path | None = None, env_files: Sequence[str | Path] = (),
    environ: Mapping[str, str] | None = None, source: str = DATA_SOURCE,
) -> AppSpec:
    """A pipeline given as data, as ``yaml.safe_load`` of a pipeline file gives it, loaded by the
    same rules as :func:`load_pipeline`: ``${VAR}`` substitution (``scalebox.env`` in ``app_dir``,
    ``env_files``, ``environ``), the 2023 aliases, the key checks, code paths relative to
    ``app_dir`` (default: the current directory). A problem is a PipelineError naming
    ``source: key.path`` (no line: data has none)."""
    if not isinstance(data, Mapping):
        raise PipelineError("the top level must be a mapping (name: ..., modules: ...)", file=source)
    try:  # one loader for files and data: the data goes through the same node reader
        text = yaml.safe_dump(dict(data), sort_keys=False, allow_unicode=True)
    except yaml.YAMLError as exc:
        raise PipelineError(f"not plain data (text, numbers, booleans, lists, mappings): {exc}",
                            file=source) from None
    base = Path(app_dir) if app_dir is not None else Path.cwd()
    return _load_text(text, source, Path(os.path.abspath(base)), env_files, environ, located=False)


def _load_text(
    text: str, display: str, app_dir: Path, env_files: Sequence[str | Path], environ: Mapping[str, str] | None,
    *, located: bool,
) -> AppSpec:
    env = dict(os.environ if environ is None else environ)
    lookup, record = _load_variables(app_dir, env_files, env)
    reader = _Reader(display, lookup, located=located)
    root = _compose(text, display)
    try:
        data = reader.value(root, ())
    except yaml.MarkedYAMLError as exc:  # an unconstructable scalar (e.g. a bad !!int)
        line = _mark_line(exc, text) if located else None
        raise PipelineError(_yaml_message(exc, text), file=display, line=line) from None
    loader = _Loader(reader, data, app_dir)
    modules = loader.modules()
    if isinstance(modules, list):
        data["modules"] = [loader.resolve(module) for module in modules]
    try:
        spec = AppSpec.model_validate({**data, "app_dir": app_dir, "variables": record})
    except ValidationError as exc:
        raise loader.from_validation(exc) from None
    loader.check(spec)
    logger.debug("loaded pipeline %s from %s (%d modules)", spec.name, display, len(spec.modules))
    return spec
