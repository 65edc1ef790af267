"""The error tree drawn in scalebox_hpc/errors.py's docstring is the real one: every ScaleboxError
subclass in the package is drawn, under its real parent, in the module that defines it, with its
own default hint marked (httpx draws its whole tree the same way)."""

from __future__ import annotations

import importlib
import pkgutil
import re
from dataclasses import dataclass

import pytest

import scalebox_hpc
from scalebox_hpc import errors
from scalebox_hpc.errors import ScaleboxError

_ROW = re.compile(r"^    (?P<tree>[│├└─ ]*)(?P<name>[A-Z]\w*)\s+(?P<hint>yes|-)\s+(?P<where>[\w.]+)\s+\S")


@dataclass(frozen=True)
class Drawn:
    """One row of the drawn tree."""

    name: str
    parent: str | None
    hint: bool
    module: str


def drawn_tree(doc: str) -> dict[str, Drawn]:
    """The rows of the docstring's tree by class name; the parent is read from the indentation
    (four columns per level, as ``├── `` and ``│   `` draw it)."""
    rows: dict[str, Drawn] = {}
    stack: list[str] = []
    for line in doc.splitlines():
        match = _ROW.match(line)
        if match is None:
            continue
        depth = len(match["tree"]) // 4
        del stack[depth:]
        parent = stack[-1] if stack else None
        assert match["name"] not in rows, f"{match['name']} drawn twice"
        rows[match["name"]] = Drawn(match["name"], parent, match["hint"] == "yes",
                                    f"scalebox_hpc.{match['where']}")
        stack.append(match["name"])
    return rows


def all_subclasses(cls: type) -> list[type]:
    """``cls`` and its subclasses, recursively, those of scalebox_hpc only (tests may add their own)."""
    found = [cls]
    for sub in cls.__subclasses__():
        if sub.__module__.startswith("scalebox_hpc."):
            found += all_subclasses(sub)
    return found


@pytest.fixture(scope="module")
def real_tree() -> list[type]:
    """Every ScaleboxError class of the package, after importing every module that defines one
    (``scalebox_hpc.__main__`` runs the CLI when imported; optional dependencies may be missing)."""
    for info in pkgutil.walk_packages(scalebox_hpc.__path__, "scalebox_hpc."):
        if info.name == "scalebox_hpc.__main__":
            continue
        try:
            importlib.import_module(info.name)
        except ModuleNotFoundError as exc:
            if (exc.name or "").startswith("scalebox_hpc"):
                raise
    return all_subclasses(ScaleboxError)


def test_the_reader_sees_nesting() -> None:
    doc = ("    A                -    errors   x\n    ├── B            yes  errors   x\n"
           "    │   └── C        -    errors   x\n    └── D            -    models   x\n")
    rows = drawn_tree(doc)
    assert [(r.name, r.parent, r.hint) for r in rows.values()] == [
        ("A", None, False), ("B", "A", True), ("C", "B", False), ("D", "A", False)]


def test_every_error_class_is_drawn(real_tree: list[type]) -> None:
    drawn = drawn_tree(errors.__doc__ or "")
    missing = sorted(cls.__name__ for cls in real_tree if cls.__name__ not in drawn)
    assert not missing, f"add these to the tree in scalebox_hpc/errors.py's docstring: {missing}"


def test_no_drawn_class_is_gone(real_tree: list[type]) -> None:
    names = {cls.__name__ for cls in real_tree}
    gone = sorted(set(drawn_tree(errors.__doc__ or "")) - names)
    assert not gone, f"drawn in scalebox_hpc/errors.py but no such ScaleboxError: {gone}"


def test_each_class_sits_under_its_parent_in_its_module(real_tree: list[type]) -> None:
    drawn = drawn_tree(errors.__doc__ or "")
    for cls in real_tree:
        row = drawn.get(cls.__name__)
        if row is None:
            continue  # test_every_error_class_is_drawn names it
        parent = None if cls is ScaleboxError else next(
            base.__name__ for base in cls.__bases__ if issubclass(base, ScaleboxError))
        assert row.parent == parent, f"{cls.__name__} is drawn under {row.parent}, but its parent is {parent}"
        assert row.module == cls.__module__, f"{cls.__name__} is defined in {cls.__module__}, drawn in {row.module}"


def test_hint_column_matches_the_class_default(real_tree: list[type]) -> None:
    drawn = drawn_tree(errors.__doc__ or "")
    wrong = sorted(cls.__name__ for cls in real_tree
                   if cls.__name__ in drawn and drawn[cls.__name__].hint != bool(cls.__dict__.get("hint")))
    assert not wrong, f"the hint column is wrong for {wrong} (yes: the class sets its own default hint)"
