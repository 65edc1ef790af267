"""Reading a pipeline file's YAML into plain data while recording the line of every key and item,
with the schema's allowed keys and 2023 aliases, and bounds against alias bombs and deep nesting."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import yaml

from scalebox_hpc.errors import PipelineError
from scalebox_hpc.pipeline.parameters import AppParameters, ModuleArguments, ModuleParameters
from scalebox_hpc.pipeline.slurm import ClusterSpec, SlurmSpec
from scalebox_hpc.pipeline.spec import ModuleSpec, MpiSpec, RemoteSpec
from scalebox_hpc.pipeline.variables import _ExpandError, expand

MAX_YAML_NODES = 100_000
"""Nodes (keys, values, list items) a pipeline file may expand to once its aliases are expanded:
a few hundred bytes of nested anchors would otherwise expand to millions of nodes (an alias bomb)."""
MAX_YAML_DEPTH = 100
"""How deeply mappings and lists may nest, aliases expanded (PyYAML composes recursively)."""


_Key = str | int
_Path = tuple[_Key, ...]
_MERGE_TAG = "tag:yaml.org,2002:merge"
_TYPED_TAGS = frozenset(f"tag:yaml.org,2002:{t}" for t in ("bool", "int", "float", "null"))

_CLUSTER_SLURM_KEYS = frozenset({"cluster", "submit_via", "local_scratch", "data_root"})
"""Set from ``clusters:`` and the module's ``cluster:``, not under a ``slurm:``."""
_TOP_KEYS = frozenset({"name", "label", "cluster", "clusters", "remotes", "parameters", "modules", "slurm"})
_ALLOWED: dict[str, frozenset[str]] = {
    "app": _TOP_KEYS,
    "app.parameters": frozenset(AppParameters.model_fields),
    "module": frozenset(ModuleSpec.model_fields),
    "module.parameters": frozenset(ModuleParameters.model_fields),
    "module.arguments": frozenset(ModuleArguments.model_fields),
    "app.slurm": frozenset(SlurmSpec.model_fields) - _CLUSTER_SLURM_KEYS,
    "module.slurm": frozenset(SlurmSpec.model_fields) - _CLUSTER_SLURM_KEYS,
    "module.mpi": frozenset(MpiSpec.model_fields),
    "cluster": frozenset(ClusterSpec.model_fields),
    "cluster.slurm": frozenset(SlurmSpec.model_fields) - _CLUSTER_SLURM_KEYS,
    "remote": frozenset(RemoteSpec.model_fields),
}
_ALIASES: dict[str, dict[str, str]] = {
    "app": {"jobs": "modules"},
    "app.parameters": {"start_message": "start_task"},
    "module": {"sink_jobs": "sink_modules", "variables": "environments", "paths": "volumes", "hosts": "slots"},
    "module.parameters": {"start_message": "start_task"},
    "module.arguments": {"task_timeout_seconds": "task_max_seconds"},
}


def _level(path: _Path) -> str | None:
    """Which schema level a mapping at ``path`` is (None: free-form, e.g. environments)."""
    match path:
        case ():
            return "app"
        case ("parameters" | "slurm" as sub,):
            return f"app.{sub}"
        case ("modules", _):
            return "module"
        case ("modules", _, "parameters" | "arguments" | "slurm" | "mpi" as sub):
            return f"module.{sub}"
        case ("clusters", _):
            return "cluster"
        case ("clusters", _, "slurm"):
            return "cluster.slurm"
        case ("remotes", _):
            return "remote"
    return None


def _dotted(path: Iterable[_Key]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def did_you_mean(word: str, candidates: Mapping[str, str] | Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest candidate, or ``""``. A mapping maps a candidate to
    the name to suggest (aliases suggest their canonical name)."""
    targets = dict(candidates) if isinstance(candidates, Mapping) else {c: c for c in candidates}
    lower = {c.lower(): target for c, target in targets.items()}
    close = difflib.get_close_matches(word.lower(), list(lower), n=1, cutoff=0.6)
    return f" (did you mean {lower[close[0]]!r}?)" if close else ""


class _Reader:
    """Turns a composed node tree into plain data, recording the line of every key and item."""

    def __init__(self, file: str, variables: Mapping[str, str], *, located: bool = True) -> None:
        self.file = file
        self.variables = variables
        self.located = located
        """Errors name the line (False for data given as a mapping: its lines mean nothing)."""
        self.lines: dict[_Path, int] = {}
        self.nodes = 0
        """Nodes visited so far (each alias counts again for every node it expands to)."""
        self._open: set[int] = set()  # ids of the mappings and lists being built: an alias to one is a cycle
        self._via: _Path | None = None  # the outermost alias being expanded, where a too large file is reported
        self._constructor = yaml.constructor.SafeConstructor()

    def error(self, message: str, path: _Path, line: int | None) -> PipelineError:
        return PipelineError(message, file=self.file, line=line if self.located else None, key=_dotted(path))

    def _visit(self, path: _Path, line: int | None) -> None:
        """Count one node; refuse a file that expands to more than MAX_YAML_NODES."""
        self.nodes += 1
        if self.nodes > MAX_YAML_NODES:
            where = path if self._via is None else self._via
            raise self.error(f"the file expands to more than {MAX_YAML_NODES} nodes (YAML aliases?)", where,
                             self.lines.get(where, line))

    def value(self, node: yaml.Node, path: _Path, alias: bool = False) -> Any:
        """Plain data of ``node`` at ``path`` (``alias``: the node is written elsewhere, an alias or a merge)."""
        line = self.lines.setdefault(path, node.start_mark.line + 1)
        self._visit(path, line)
        if not isinstance(node, yaml.MappingNode | yaml.SequenceNode):
            return self.scalar(node, path)
        if id(node) in self._open:
            raise self.error("a YAML alias refers to a mapping or list that contains it (a recursive anchor)",
                             path, line)
        if len(path) > MAX_YAML_DEPTH:  # nesting within the limit, but aliases of aliases go deeper
            raise self.error(f"the file expands deeper than {MAX_YAML_DEPTH} levels (YAML aliases?)", path, line)
        outermost = alias and self._via is None
        if outermost:
            self._via = path
        self._open.add(id(node))
        try:
            return self.mapping(node, path) if isinstance(node, yaml.MappingNode) else self.sequence(node, path)
        finally:
            self._open.discard(id(node))
            if outermost:
                self._via = None

    def sequence(self, node: yaml.SequenceNode, path: _Path) -> list[Any]:
        items = []
        for index, item in enumerate(node.value):
            alias = not _within(item, node)
            # an alias item's own mark is its anchor's: the list's line says where it is used
            self.lines[(*path, index)] = self.lines[path] if alias else item.start_mark.line + 1
            items.append(self.value(item, (*path, index), alias))
        return items

    def scalar(self, node: yaml.Node, path: _Path) -> Any:
        if node.tag in _TYPED_TAGS:
            return self._constructor.construct_object(node)
        try:
            return expand(str(node.value), self.variables)
        except _ExpandError as exc:
            raise self.error(str(exc), path, node.start_mark.line + 1) from None

    def mapping(self, node: yaml.MappingNode, path: _Path) -> dict[str, Any]:
        level = _level(path)
        aliases = _ALIASES.get(level or "", {})
        allowed = _ALLOWED.get(level or "")
        out: dict[str, Any] = {}
        given: dict[str, tuple[str, int]] = {}
        for key_node, value_node, explicit in self.entries(node, path):
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                raise self.error("mapping keys must be plain scalars", path, line)
            raw = str(key_node.value)
            key = aliases.get(raw, raw)
            if allowed is not None and key not in allowed:
                hint = did_you_mean(raw, {**{k: k for k in allowed}, **aliases})
                raise self.error(f"unknown key {raw!r}{hint}", path, line)
            if key in out:
                if not explicit:
                    continue
                raise self.error(self._duplicate(path, raw, key, given[key]), path, line)
            given[key] = (raw, line)
            self.lines[(*path, key)] = line
            out[key] = self.value(value_node, (*path, key), not _within(value_node, node))
        return out

    def entries(self, node: yaml.MappingNode, path: _Path, explicit: bool = True,
                chain: tuple[int, ...] = ()) -> Iterator[tuple[yaml.Node, yaml.Node, bool]]:
        """A mapping's (key, value, explicit) pairs: its own, then those of ``<<`` merge sources
        (``chain``: the mappings whose merges led here, to refuse a mapping merged into itself)."""
        chain = (*chain, id(node))
        merges: list[tuple[yaml.Node, int]] = []
        for key, value in node.value:
            line = key.start_mark.line + 1
            self._visit(path, line)  # merged keys count too: repeated merges multiply like aliases
            if key.tag == _MERGE_TAG:
                merges.append((value, line))
            else:
                yield key, value, explicit
        for merge, line in merges:
            sources = merge.value if isinstance(merge, yaml.SequenceNode) else [merge]
            for source in sources:
                self._visit(path, line)
                if not isinstance(source, yaml.MappingNode):
                    raise self.error("a merge key '<<' needs a mapping or a list of mappings", path, line)
                if id(source) in chain:
                    raise self.error("a merge key '<<' merges a mapping into itself (a recursive anchor)", path, line)
                if len(chain) > MAX_YAML_DEPTH:
                    raise self.error(f"merge keys '<<' nest deeper than {MAX_YAML_DEPTH} levels", path, line)
                yield from self.entries(source, path, explicit=False, chain=chain)

    @staticmethod
    def _duplicate(path: _Path, raw: str, key: str, first: tuple[str, int]) -> str:
        what = "module name" if path == ("modules",) else "key"
        also = f" (given as {first[0]!r} and {raw!r})" if first[0] != raw else ""
        return f"duplicate {what} {key!r}{also}; first at line {first[1]}"


def _within(child: yaml.Node, parent: yaml.Node) -> bool:
    """Whether ``child`` is written inside ``parent`` (not an alias of a node written elsewhere)."""
    return bool(parent.start_mark.index <= child.start_mark.index <= parent.end_mark.index)


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader whose composer refuses to nest deeper than MAX_YAML_DEPTH: it recurses once per
    level, and thousands of ``[`` would end in a RecursionError instead of a PipelineError.

    Its scanner also takes a TAB between tokens on a line as white space, as YAML 1.2 does (and
    Scalebox's Go loader did): ``key:<TAB>value``. A TAB in indentation (before the first token of
    a line) is still an error; quoted and block scalars are scanned as before."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def scan_to_next_token(self) -> None:
        while True:
            super().scan_to_next_token()
            if self.peek() != "\t" or not self._after_content():
                return
            while self.peek() in " \t":
                self.forward()

    def _after_content(self) -> bool:
        """Whether something other than white space precedes the reading position on its line."""
        line_start = self.pointer - self.column  # the whole text is the buffer (a str stream)
        return bool(self.buffer[max(0, line_start):self.pointer].strip())

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self._depth >= MAX_YAML_DEPTH:
            mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]  # untyped in types-PyYAML
            raise yaml.composer.ComposerError(None, None, f"mappings and lists nested deeper than {MAX_YAML_DEPTH}"
                                              " levels", mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _compose(text: str, file: str) -> yaml.Node:
    """The composed root node; malformed YAML becomes a PipelineError at the YAML mark's line."""
    try:
        root = yaml.compose(text, Loader=_BoundedLoader)
    except yaml.MarkedYAMLError as exc:
        line = _mark_line(exc, text)
        message = _yaml_message(exc, text)
        source = text.splitlines()
        if line is not None and line <= len(source) and "${" in source[line - 1] and "flow" in str(exc.context):
            message += "; quote values with ${...} inside [...] or {...}, or use a block list"
        raise PipelineError(message, file=file, line=line) from None
    except yaml.YAMLError as exc:
        raise PipelineError(f"invalid YAML: {' '.join(str(exc).split())}", file=file) from None
    if root is None:
        raise PipelineError("the pipeline file is empty (expected a mapping with name and modules)", file=file)
    if not isinstance(root, yaml.MappingNode):
        raise PipelineError("the top level must be a mapping (name: ..., modules: ...)", file=file,
                            line=root.start_mark.line + 1)
    return root


def _yaml_message(exc: yaml.MarkedYAMLError, text: str) -> str:
    problem = " ".join(str(exc.problem or "syntax error").split())
    if exc.context:
        context = " ".join(str(exc.context).split())
        where = f" at line {_clamp(exc.context_mark, text)}" if exc.context_mark is not None else ""
        return f"invalid YAML: {problem} ({context}{where})"
    return f"invalid YAML: {problem}"


def _clamp(mark: yaml.Mark, text: str) -> int:
    """A mark's 1-based line; a mark at the end of the file points at its last line."""
    return min(mark.line + 1, max(1, len(text.splitlines())))


def _mark_line(exc: yaml.MarkedYAMLError, text: str) -> int | None:
    mark = exc.problem_mark or exc.context_mark
    return None if mark is None else _clamp(mark, text)

