"""Pipeline files that expand without bound (audit F21): alias bombs, recursive anchors, deep nesting.

Each must end in a PipelineError naming file:line: key, never a RecursionError or minutes of work.
"""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

import pytest

from scalebox_hpc import pipeline
from scalebox_hpc.errors import PipelineError
from scalebox_hpc.pipeline import MAX_YAML_DEPTH, MAX_YAML_NODES, load_pipeline


def write(root: Path, text: str) -> Path:
    """app.yaml (dedented) and a run.sh for module ``m``."""
    (root / "m").mkdir(parents=True, exist_ok=True)
    (root / "m" / "run.sh").write_text("#!/bin/bash\ntrue\n")
    app = root / "app.yaml"
    app.write_text(textwrap.dedent(text))
    return app


def alias_bomb(width: int = 10, levels: int = 6) -> str:
    """The audit's bomb: each anchor a list of ``width`` aliases of the one before (width**levels leaves)."""
    lines = ["name: bomb", "modules:", "  m:", "    environments:",
             "      l0: &l0 [" + ", ".join(["xxxx"] * width) + "]"]
    for level in range(1, levels):
        lines.append(f"      l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


@pytest.fixture
def visits(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the nodes the reader visits (a work bound that does not depend on the machine's speed)."""
    counted = [0]
    original = pipeline._Reader._visit

    def counting(self: pipeline._Reader, path: pipeline._Path, line: int | None) -> None:
        counted[0] += 1
        original(self, path, line)

    monkeypatch.setattr(pipeline._Reader, "_visit", counting)
    return counted


def test_alias_bomb_is_refused_after_the_node_limit(tmp_path: Path, visits: list[int]) -> None:
    text = alias_bomb()
    assert len(text.encode()) < 500  # ~450 bytes that would expand to 10**6 leaves
    app = write(tmp_path, text)
    started = time.perf_counter()
    with pytest.raises(PipelineError, match=rf"expands to more than {MAX_YAML_NODES} nodes \(YAML aliases\?\)") as exc:
        load_pipeline(app, environ={})
    print(f"alias bomb refused in {time.perf_counter() - started:.3f} s after {visits[0]} nodes")
    assert visits[0] == MAX_YAML_NODES + 1  # stopped at the limit, not after expanding everything
    # reported where the alias whose expansion overflows is used: l4 (10**5 leaves) is the first too big
    assert exc.value.file == str(app) and exc.value.line == 9
    assert exc.value.key.startswith("modules.m.environments.l4[")


def test_merge_key_bomb_is_refused(tmp_path: Path, visits: list[int]) -> None:
    lines = ["name: bomb", "modules:", "  m:", "    environments:", "      k0: &k0 {A: x}"]
    for level in range(1, 7):
        lines.append(f"      k{level}: &k{level} {{<<: [" + ", ".join([f"*k{level - 1}"] * 10) + "]}")
    with pytest.raises(PipelineError, match="expands to more than"):
        load_pipeline(write(tmp_path, "\n".join(lines) + "\n"), environ={})
    assert visits[0] == MAX_YAML_NODES + 1


def test_recursive_anchor_is_a_pipeline_error(tmp_path: Path) -> None:
    app = write(tmp_path, """\
        name: r
        modules:
          m: &m {environments: {X: *m}}
    """)
    with pytest.raises(PipelineError, match="recursive anchor") as exc:
        load_pipeline(app, environ={})
    assert (exc.value.line, exc.value.key) == (3, "modules.m.environments.X")


def test_recursive_list_anchor_is_a_pipeline_error(tmp_path: Path) -> None:
    app = write(tmp_path, """\
        name: r
        modules:
          m:
            volumes: &v [/a, [*v]]
    """)
    with pytest.raises(PipelineError, match="recursive anchor") as exc:
        load_pipeline(app, environ={})
    assert exc.value.line == 4 and exc.value.key == "modules.m.volumes[1][0]"


def test_mapping_merged_into_itself_is_a_pipeline_error(tmp_path: Path) -> None:
    app = write(tmp_path, """\
        name: r
        modules:
          m: &m
            environments: {X: "1"}
            <<: *m
    """)
    with pytest.raises(PipelineError, match="merges a mapping into itself") as exc:
        load_pipeline(app, environ={})
    assert (exc.value.line, exc.value.key) == (5, "modules.m")


def test_deeply_nested_plain_yaml_is_a_pipeline_error(tmp_path: Path) -> None:
    deep = "[" * 5000 + "]" * 5000
    app = write(tmp_path, f"name: d\nmodules:\n  m:\n    volumes: {deep}\n")
    with pytest.raises(PipelineError, match=f"nested deeper than {MAX_YAML_DEPTH} levels") as exc:
        load_pipeline(app, environ={})
    assert exc.value.line == 4
    mappings = "{a: " * 5000 + "}" * 5000
    with pytest.raises(PipelineError, match="nested deeper than"):
        load_pipeline(write(tmp_path, f"name: d\nmodules:\n  m:\n    environments: {mappings}\n"), environ={})


def test_aliases_of_aliases_may_not_nest_past_the_limit(tmp_path: Path) -> None:
    # each anchor nests 60 levels (within the limit) and holds the one before: 180 levels expanded
    step = 60
    lines = ["name: d", "modules:", "  m:", "    volumes:", "      - &a0 " + "[" * step + "x" + "]" * step]
    for level in (1, 2):
        lines.append(f"      - &a{level} " + "[" * step + f"*a{level - 1}" + "]" * step)
    with pytest.raises(PipelineError, match=f"expands deeper than {MAX_YAML_DEPTH} levels"):
        load_pipeline(write(tmp_path, "\n".join(lines) + "\n"), environ={})


def test_ordinary_aliases_still_work(tmp_path: Path) -> None:
    (tmp_path / "n").mkdir()
    (tmp_path / "n" / "run.sh").write_text("true\n")
    spec = load_pipeline(write(tmp_path, """\
        name: shared
        modules:
          m:
            environments: &env {MODE: fast, LEVEL: "3"}
            slots: &slots [".*:2"]
          n:
            environments: *env
            slots: *slots
            arguments:
              <<: &args {max_idle_polls: 3}
    """), environ={})
    assert spec.module("m").environments == spec.module("n").environments == {"MODE": "fast", "LEVEL": "3"}
    assert spec.module("n").slots[0].count == 2 and spec.module("n").arguments.max_idle_polls == 3


def test_many_ordinary_aliases_within_the_limit(tmp_path: Path) -> None:
    # 300 modules sharing one 20-variable environments block: ~13 000 nodes expanded, accepted
    env = ", ".join(f"V{i}: v{i}" for i in range(20))
    lines = ["name: many", "modules:", f"  m: {{environments: &env {{{env}}}}}"]
    for i in range(300):
        (tmp_path / f"n{i}").mkdir()
        (tmp_path / f"n{i}" / "run.sh").write_text("true\n")
        lines.append(f"  n{i}: {{environments: *env}}")
    spec = load_pipeline(write(tmp_path, "\n".join(lines) + "\n"), environ={})
    assert len(spec.modules) == 301 and spec.modules[-1].environments["V19"] == "v19"
