"""The code-size counts of the 2026-12 review (``design/review-2026-12.md`` §2 and §8), re-runnable.

Counted as the review counted: one AST pass over the package (``scalebox_hpc/``, tests
excluded), a function from its ``def`` line to its last line (docstring included, decorators
left out), nested functions and methods included; a module's size is its line count. The same
pass over ``tests/`` gives the tests' line. ``duplicates --repo <tree> --most 200`` (when the
tool is installed) gives the pairs, grouped by where their two sides are.

Usage: ``python benchmarks/code_counts.py [--rev REV] [--repo DIR]``; prints one JSON object.
``--rev``: the tree of a commit (``git archive`` into a temporary directory), else the working
tree of ``--repo`` (default: this checkout). Reads files only; no timing in it.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PACKAGE = "scalebox_hpc"
LONG, VERY_LONG, BIG_MODULE, TOP = 30, 60, 400, 15


@dataclass(frozen=True)
class Function:
    """One ``def``: where it is and how long it is."""

    path: str
    line: int
    name: str
    lines: int
    annotated: bool


def functions(path: Path, shown: str) -> Iterator[Function]:
    """Every function and method of one file, nested ones included, named ``Class.method``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))

    def walk(node: ast.AST, prefix: str) -> Iterator[Function]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                assert child.end_lineno is not None
                yield Function(shown, child.lineno, prefix + child.name, child.end_lineno - child.lineno + 1,
                               child.returns is not None)
                yield from walk(child, prefix + child.name + ".")
            elif isinstance(child, ast.ClassDef):
                yield from walk(child, prefix + child.name + ".")
            else:
                yield from walk(child, prefix)

    yield from walk(tree, "")


def percentile(values: list[int], p: float) -> float:
    """The ``p``-th percentile, linear between the closest ranks (numpy's default)."""
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    low = int(k)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def sizes(root: Path, folder: str) -> dict[str, Any]:
    """The function and module counts of ``root/folder``."""
    files = sorted((root / folder).rglob("*.py"))
    found = [f for p in files for f in functions(p, p.relative_to(root).as_posix())]
    lengths = [f.lines for f in found]
    modules = {p.relative_to(root).as_posix(): len(p.read_text(encoding="utf-8").splitlines()) for p in files}
    counts = list(modules.values())
    return {
        "functions": len(found),
        "function_lines": {
            "median": statistics.median(lengths), "mean": round(statistics.fmean(lengths), 1),
            "p75": percentile(lengths, 75), "p90": percentile(lengths, 90), "p95": percentile(lengths, 95),
            "max": max(lengths),
        },
        f"functions_over_{LONG}": sum(n > LONG for n in lengths),
        f"functions_over_{VERY_LONG}": sum(n > VERY_LONG for n in lengths),
        "return_annotated": sum(f.annotated for f in found),
        "modules": len(modules),
        "module_lines": {"median": statistics.median(counts), "mean": round(statistics.fmean(counts), 1),
                         "total": sum(counts)},
        f"modules_over_{BIG_MODULE}": dict(sorted(((m, n) for m, n in modules.items() if n > BIG_MODULE),
                                                   key=lambda kv: -kv[1])),
        "longest_functions": [f"{f.lines} {f.path}:{f.line} {f.name}"
                              for f in sorted(found, key=lambda f: (-f.lines, f.path, f.line))[:TOP]],
    }


_PAIR = re.compile(r"^D\d+ (\S+?):\d+-\d+ ~ (\S+?):\d+-\d+(.*)$")
_HEAD = re.compile(r"^(\d+) pairs? of places \((\d+) files read\)(?:.*?\((\d+) by shape alone, (\d+) of those)?")


def _side(path: str) -> str:
    if path.startswith(PACKAGE + "/"):
        return "package"
    if path.startswith("tests/"):
        return "tests"
    if path.endswith(".sql"):
        return "sql"
    return "other"


def duplicates(root: Path) -> dict[str, Any] | None:
    """``duplicates --repo root --most 200``: the head line's counts and the pairs by where they
    are (``package``: both sides in scalebox_hpc/; ``package~tests``: one in each ...)."""
    tool = shutil.which("duplicates")
    if tool is None:
        return None
    out = subprocess.run([tool, "--repo", str(root), "--most", "200", "--seconds", "120"],
                         capture_output=True, text=True, check=False).stdout.splitlines()
    head = _HEAD.match(out[0]) if out else None
    groups: Counter[str] = Counter()
    package_pairs = []
    for line in out[1:]:
        m = _PAIR.match(line)
        if m is None:
            continue
        where = "~".join(sorted({_side(m[1]), _side(m[2])}))
        groups[where] += 1
        if where == "package":
            package_pairs.append(line.split(" ", 1)[1])
    return {
        "pairs": int(head[1]) if head else None, "files_read": int(head[2]) if head else None,
        "by_shape": int(head[3]) if head and head[3] else 0, "boilerplate": int(head[4]) if head and head[4] else 0,
        "by_place": dict(sorted(groups.items())), "package_pairs": package_pairs,
        "incomplete": [line for line in out if line.startswith("incomplete:")],
    }


def _export(repo: Path, rev: str, into: Path) -> None:
    archive = subprocess.run(["git", "-C", str(repo), "archive", "--format=tar", rev, "--"],
                             capture_output=True, check=True).stdout
    (into / "tree").mkdir()
    # tar(1), not tarfile: this Python's extractall may predate the ``filter`` argument
    subprocess.run(["tar", "-x", "-C", str(into / "tree")], input=archive, check=True)


def counts(root: Path) -> dict[str, Any]:
    """All counts of the tree at ``root``."""
    return {"package": sizes(root, PACKAGE), "tests": sizes(root, "tests"), "duplicates": duplicates(root)}


def main(argv: list[str] | None = None) -> int:
    """Print the counts of one tree as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--rev", default=None, help="a commit to count instead of the working tree")
    args = parser.parse_args(argv)
    if args.rev is None:
        result = {"tree": str(args.repo), **counts(args.repo)}
    else:
        with tempfile.TemporaryDirectory(prefix="code-counts-") as tmp:
            _export(args.repo, args.rev, Path(tmp))
            result = {"rev": args.rev, **counts(Path(tmp) / "tree")}
    json.dump(result, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
