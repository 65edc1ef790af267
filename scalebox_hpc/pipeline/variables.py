"""``${VAR}`` substitution and the env files (``scalebox.env``, ``-e`` files) it reads variables from."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from scalebox_hpc.errors import PipelineError

logger = logging.getLogger(__name__)

DEFAULT_ENV_FILE = "scalebox.env"
"""Read from the app dir (when present) before any ``-e`` file."""

_REFERENCE = re.compile(r"\$\$\{|\$\{(?P<body>[^}]*)(?P<close>\}?)")
_REFERENCE_BODY = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?-)(?P<default>.*))?", re.DOTALL)


class _ExpandError(ValueError):
    pass


def expand(text: str, variables: Mapping[str, str]) -> str:
    """Replace ``${VAR}``, ``${VAR:-default}`` (unset or empty) and ``${VAR-default}`` (unset);
    ``$${`` is a literal ``${``. Raises ValueError for undefined or malformed references."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$${":
            return "${"
        body = match["body"]
        if not match["close"]:
            raise _ExpandError(f"unterminated variable reference '${{{body}'")
        ref = _REFERENCE_BODY.fullmatch(body)
        if ref is None:
            raise _ExpandError(f"malformed variable reference '${{{body}}}'")
        value = variables.get(ref["name"])
        if ref["op"] == ":-" and not value:
            return str(ref["default"])
        if ref["op"] == "-" and value is None:
            return str(ref["default"])
        if value is None:
            raise _ExpandError(f"undefined variable {ref['name']!r} (define it in {DEFAULT_ENV_FILE}, an -e file "
                               "or the environment, or write ${NAME:-default})")
        return value

    return _REFERENCE.sub(replace, text)


_ENV_LINE = re.compile(r"(?:export\s+)?(?P<key>[A-Za-z_][A-Za-z0-9_]*)\s*=\s*(?P<value>.*)", re.DOTALL)
_DOUBLE = re.compile(r'"(?P<text>(?:[^"\\]|\\.)*)"\s*(?:#.*)?', re.DOTALL)
_SINGLE = re.compile(r"'(?P<text>[^']*)'\s*(?:#.*)?", re.DOTALL)
_ESCAPE = re.compile(r"\\(.)")


def _env_value_text(raw: str, lookup: Mapping[str, str]) -> str | None:
    """The value of one ``KEY=VALUE`` line; None when its quoting is malformed."""
    if raw.startswith("'"):
        single = _SINGLE.fullmatch(raw)
        return None if single is None else single["text"]
    if raw.startswith('"'):
        double = _DOUBLE.fullmatch(raw)
        if double is None:
            return None
        text = expand(double["text"], lookup)
        return _ESCAPE.sub(lambda m: "\n" if m[1] == "n" else m[1], text)
    return expand(re.sub(r"\s+#.*$", "", raw).strip(), lookup)


def read_env_file(path: Path, environ: Mapping[str, str], known: Mapping[str, str] | None = None) -> dict[str, str]:
    """Parse ``KEY=VALUE`` lines (``#`` comments, quotes, ``export`` prefix, ``${VAR}`` from
    ``environ`` then ``known`` and earlier lines). Malformed lines raise PipelineError."""
    display = str(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineError(f"cannot read env file: {exc}", file=display) from exc
    found: dict[str, str] = {}
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = _ENV_LINE.fullmatch(stripped)
        lookup = {**(known or {}), **found, **environ}
        try:
            value = None if match is None else _env_value_text(match["value"], lookup)
        except _ExpandError as exc:
            raise PipelineError(str(exc), file=display, line=number, key=match["key"] if match else "") from None
        if match is None or value is None:
            raise PipelineError(f"expected KEY=VALUE, got {stripped!r}", file=display, line=number)
        found[match["key"]] = value
    return found


def _env_file_path(app_dir: Path, name: str | Path) -> Path:
    """``-e X``: a name without a slash means ``<app dir>/X.env`` (or ``<app dir>/X``), else a path."""
    text = str(name)
    candidates = [Path(text)]
    if "/" not in text:
        candidates = [app_dir / f"{text}.env", app_dir / text, Path(text)]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    tried = ", ".join(str(c) for c in candidates)
    raise PipelineError(f"env file {text!r} not found (tried {tried})", file=text)


def _load_variables(
    app_dir: Path, env_files: Sequence[str | Path], environ: Mapping[str, str]
) -> tuple[dict[str, str], dict[str, str]]:
    """(lookup for ``${VAR}``, the env-file variables to record with their effective values)."""
    paths = [app_dir / DEFAULT_ENV_FILE] if (app_dir / DEFAULT_ENV_FILE).is_file() else []
    paths += [_env_file_path(app_dir, name) for name in env_files]
    merged: dict[str, str] = {}
    for path in paths:
        merged.update(read_env_file(path, environ, merged))
        logger.debug("read env file %s", path)
    record = {key: environ.get(key, value) for key, value in merged.items()}
    return {**merged, **environ}, record

