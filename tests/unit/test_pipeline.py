"""Pipeline files: loading, variables, aliases, defaults and every error located as file:line: key."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from scalebox_hpc.errors import PipelineError
from scalebox_hpc.models import ConflictAction
from scalebox_hpc.pipeline import (
    AppSpec,
    ModuleArguments,
    ModuleParameters,
    ModuleSpec,
    SlotSpec,
    expand,
    load_pipeline,
    read_env_file,
)

GOOD = """\
name: primes
label: Count primes
cluster: local
parameters:
  initial_status: initial
  start_task: go
modules:
  scatter:
    sink_modules: [calc]
    environments:
      - NUM_GROUPS=${NUM_GROUPS}
      - GREETING=hello=world
  calc:
    base_image: docker://alpine:3.20
    sink_modules: [gather]
    volumes: [/data:/data]
    slots: ["node-0[0-9]:2", "login.*"]
    environments:
      LENGTH: ${LENGTH:-1000}
      DEBUG: true
    arguments:
      task_max_seconds: 60
      max_idle_polls: 5
      slot_options: always_running
      conflict_action: ignore
      dir_limit_gb: {/tmp: 1.5}
      task_dist_mode: host-bound
    parameters:
      retry_rules: ["1", "2:3", "*"]
  gather:
    code_path: code/gather
    schedule_mode: head
"""


def write(
    root: Path, text: str, scripts: tuple[str, ...] = ("scatter", "calc", "code/gather"),
    files: dict[str, str] | None = None,
) -> Path:
    """app.yaml (dedented) + a run.sh in each of ``scripts`` (relative dirs) + extra files."""
    root.mkdir(parents=True, exist_ok=True)
    for rel in scripts:
        (root / rel).mkdir(parents=True, exist_ok=True)
        (root / rel / "run.sh").write_text("#!/bin/bash\ntrue\n")
    for name, body in (files or {}).items():
        (root / name).write_text(textwrap.dedent(body))
    app = root / "app.yaml"
    app.write_text(textwrap.dedent(text))
    return app


def fails(app: Path, *, env_files: tuple[str, ...] = (), environ: dict[str, str] | None = None) -> PipelineError:
    with pytest.raises(PipelineError) as info:
        load_pipeline(app, env_files=env_files, environ={} if environ is None else environ)
    return info.value


def test_good_file(tmp_path: Path) -> None:
    app = write(tmp_path, GOOD)
    spec = load_pipeline(app, environ={"NUM_GROUPS": "7"})
    assert spec.name == "primes" and spec.label == "Count primes" and spec.cluster == "local"
    assert spec.parameters.initial_status == "INITIAL" and spec.parameters.start_task == "go"
    assert [m.name for m in spec.modules] == ["scatter", "calc", "gather"]
    assert spec.app_dir == tmp_path and spec.app_dir.is_absolute()
    scatter, calc, gather = spec.modules
    assert scatter.environments == {"NUM_GROUPS": "7", "GREETING": "hello=world"}
    assert scatter.code_path == tmp_path / "scatter"
    assert scatter.slots == [SlotSpec(host_regex=".*", count=1)]
    assert calc.base_image == "docker://alpine:3.20" and calc.volumes == ["/data:/data"]
    assert calc.slots == [SlotSpec(host_regex="node-0[0-9]", count=2), SlotSpec(host_regex="login.*", count=1)]
    assert calc.environments == {"LENGTH": "1000", "DEBUG": "true"}
    args = calc.arguments
    assert args.task_max_seconds == 60.0 and args.max_idle_polls == 5 and args.always_running
    assert args.conflict_action is ConflictAction.IGNORE and args.dir_limit_gb == {"/tmp": 1.5}
    assert args.task_dist_mode == "HOST-BOUND"
    assert calc.parameters.retry_rules == ["1", "2:3", "*"]
    assert gather.code_path == tmp_path / "code" / "gather"
    assert gather.schedule_mode == "HEAD" and gather.slots == [SlotSpec(host_regex=".*", count=1)]
    assert gather.sink_modules == [] and not gather.arguments.always_running
    assert spec.module("calc") is calc
    with pytest.raises(KeyError):
        spec.module("nope")
    assert calc.script("run.sh") == tmp_path / "calc" / "run.sh"
    assert calc.script("setup.sh") is None


def test_round_trip_through_json(tmp_path: Path) -> None:
    spec = load_pipeline(write(tmp_path, GOOD), environ={"NUM_GROUPS": "7"})
    data = spec.model_dump(mode="json")
    assert AppSpec.model_validate(data) == spec
    for module, raw in zip(spec.modules, data["modules"], strict=True):
        assert ModuleSpec.model_validate(raw) == module


def test_module_spec_from_database_does_not_touch_the_filesystem() -> None:
    spec = ModuleSpec.model_validate({"name": "calc", "code_path": "/nonexistent/calc", "slots": [".*:3"]})
    assert spec.code_path == Path("/nonexistent/calc") and spec.slots[0].count == 3
    assert spec.script("run.sh") is None
    with pytest.raises(ValidationError):
        ModuleSpec.model_validate({"name": "calc", "code_path": "relative/calc"})


def test_specs_are_frozen(tmp_path: Path) -> None:
    spec = load_pipeline(write(tmp_path, GOOD), environ={"NUM_GROUPS": "1"})
    with pytest.raises(ValidationError):
        spec.name = "other"
    with pytest.raises(ValidationError):
        spec.modules[0].arguments.max_idle_polls = 1


def test_accepts_a_directory(tmp_path: Path) -> None:
    write(tmp_path, "name: x\nmodules:\n  calc: {}\n")
    assert load_pipeline(tmp_path, environ={}).name == "x"


# -- errors ---------------------------------------------------------------------------------------
def test_malformed_yaml_names_the_line(tmp_path: Path) -> None:
    app = write(tmp_path, "name: x\nmodules:\n  calc:\n    sink_modules: [a, b\n  other: {}\n")
    err = fails(app)
    assert err.file == str(app) and err.line in (4, 5)
    assert str(err).startswith(f"{app}:{err.line}: invalid YAML")
    assert "\n" not in str(err)


def test_malformed_yaml_at_end_of_file(tmp_path: Path) -> None:
    err = fails(write(tmp_path, "name: x\nmodules:\n  a: [\n"))
    assert err.line == 3 and "flow" in str(err) and "line 4" not in str(err)


def test_unquoted_reference_in_flow_list_gets_a_hint(tmp_path: Path) -> None:
    err = fails(write(tmp_path, "name: x\nmodules:\n  calc:\n    environments: [A=${A}]\n"))
    assert err.line == 4 and "quote" in str(err)


@pytest.mark.parametrize("text", ["", "# only a comment\n", "- a\n- b\n", "just text\n"])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str) -> None:
    err = fails(write(tmp_path, text))
    assert "mapping" in str(err)


def test_multiple_documents_are_an_error(tmp_path: Path) -> None:
    err = fails(write(tmp_path, "name: x\nmodules: {calc: {}}\n---\nname: y\n"))
    assert err.line == 3 and "invalid YAML" in str(err)


def test_missing_file(tmp_path: Path) -> None:
    err = fails(tmp_path / "nope.yaml")
    assert "cannot read" in str(err) and err.file.endswith("nope.yaml")


@pytest.mark.parametrize(
    ("text", "line", "key", "suggestion"),
    [
        ("name: x\nmodles:\n  calc: {}\n", 2, "", "modules"),
        ("name: x\nmodules:\n  calc:\n    sink_moduls: []\n", 4, "modules.calc", "sink_modules"),
        ("name: x\nmodules:\n  calc:\n    arguments:\n      task_max_secs: 3\n", 5, "modules.calc.arguments",
         "task_max_seconds"),
        ("name: x\nmodules:\n  calc:\n    parameters:\n      retry_rule: []\n", 5, "modules.calc.parameters",
         "retry_rules"),
        ("name: x\nparameters:\n  start_tsk: a\nmodules:\n  calc: {}\n", 3, "parameters", "start_task"),
        ("name: x\nmodules:\n  calc:\n    sink_job: []\n", 4, "modules.calc", "sink_modules"),
        ("name: x\nmodules:\n  calc:\n    Base_Image: a\n", 4, "modules.calc", "base_image"),
    ],
)
def test_unknown_keys_with_did_you_mean(tmp_path: Path, text: str, line: int, key: str, suggestion: str) -> None:
    err = fails(write(tmp_path, text))
    assert err.line == line and err.key == key
    assert "unknown key" in str(err) and f"did you mean {suggestion!r}?" in str(err)


def test_unknown_key_without_suggestion(tmp_path: Path) -> None:
    err = fails(write(tmp_path, "name: x\nmodules:\n  calc:\n    zzzzzz: 1\n"))
    assert str(err).endswith("unknown key 'zzzzzz'")


def test_unknown_sink_with_did_you_mean_and_line(tmp_path: Path) -> None:
    text = """\
        name: primes
        modules:
          scatter:
            sink_modules: [calc]
          calc:
            sink_modules:
              - gathr
          gather: {}
    """
    app = write(tmp_path, text, scripts=("scatter", "calc", "gather"))
    err = fails(app)
    assert str(err) == f"{app}:7: modules.calc.sink_modules: unknown module 'gathr' (did you mean 'gather'?)"


def test_unknown_sink_in_flow_list(tmp_path: Path) -> None:
    text = "name: x\nmodules:\n  calc:\n    sink_modules: [calc, nothing]\n"
    err = fails(write(tmp_path, text))
    assert err.line == 4 and err.key == "modules.calc.sink_modules" and str(err).endswith("unknown module 'nothing'")


def test_duplicate_module_names(tmp_path: Path) -> None:
    err = fails(write(tmp_path, "name: x\nmodules:\n  calc: {}\n  scatter: {}\n  calc: {}\n"))
    assert err.line == 5 and err.key == "modules" and "duplicate module name 'calc'" in str(err)
    assert "first at line 3" in str(err)


def test_duplicate_module_names_in_list_form(tmp_path: Path) -> None:
    err = fails(write(tmp_path, "name: x\nmodules:\n  - name: calc\n  - name: calc\n"))
    assert err.line == 4 and "duplicate module name 'calc'" in str(err)


@pytest.mark.parametrize(
    ("text", "line", "key"),
    [
        ("name: x\nname: y\nmodules: {calc: {}}\n", 2, ""),
        ("name: x\nmodules:\n  calc:\n    environments: {A: 1, A: 2}\n", 4, "modules.calc.environments"),
        ("name: x\nmodules:\n  calc:\n    arguments:\n      max_idle_polls: 1\n      max_idle_polls: 2\n", 6,
         "modules.calc.arguments"),
    ],
)
def test_duplicate_keys_in_any_mapping(tmp_path: Path, text: str, line: int, key: str) -> None:
    err = fails(write(tmp_path, text))
    assert err.line == line and err.key == key and "duplicate key" in str(err)


def test_alias_and_canonical_key_together_are_a_duplicate(tmp_path: Path) -> None:
    err = fails(write(tmp_path, "name: x\nmodules:\n  calc:\n    sink_modules: []\n    sink_jobs: []\n"))
    assert err.line == 5 and err.key == "modules.calc"
    assert "duplicate key 'sink_modules' (given as 'sink_modules' and 'sink_jobs'); first at line 4" in str(err)


def test_missing_run_sh(tmp_path: Path) -> None:
    err = fails(write(tmp_path, "name: x\nmodules:\n  calc: {}\n  zz: {}\n", scripts=("calc",)))
    assert err.line == 4 and err.key == "modules.zz"
    assert str(err).endswith(f"no run.sh in {tmp_path / 'zz'}")


def test_missing_run_sh_in_explicit_code_path(tmp_path: Path) -> None:
    err = fails(write(tmp_path, "name: x\nmodules:\n  calc:\n    base_image: a\n    code_path: src\n"))
    assert err.line == 5 and err.key == "modules.calc" and f"no run.sh in {tmp_path / 'src'}" in str(err)


@pytest.mark.parametrize(
    ("slot", "expected"),
    [("node:0", "at least 1"), ("node:two", "not an integer"), ("node:-1", "at least 1"), ("'[a-:3'", "regex"),
     ("':2'", "empty host regex")],
)
def test_bad_slot_spec(tmp_path: Path, slot: str, expected: str) -> None:
    err = fails(write(tmp_path, f"name: x\nmodules:\n  calc:\n    slots:\n      - .*:1\n      - {slot}\n"))
    assert err.line == 6 and err.key == "modules.calc.slots[1]" and expected in str(err)


def test_slot_regex_with_colon_and_groups(tmp_path: Path) -> None:
    spec = load_pipeline(write(tmp_path, "name: x\nmodules:\n  calc:\n    slots: ['(?:a|b)', 'n(?:1)+:4']\n"),
                         environ={})
    assert spec.modules[0].slots == [SlotSpec(host_regex="(?:a|b)", count=1), SlotSpec(host_regex="n(?:1)+", count=4)]


def test_empty_slots(tmp_path: Path) -> None:
    err = fails(write(tmp_path, "name: x\nmodules:\n  calc:\n    slots: []\n"))
    assert err.line == 4 and "slots is empty" in str(err)


def test_undefined_variable(tmp_path: Path) -> None:
    app = write(tmp_path, "name: x\nmodules:\n  calc:\n    environments:\n      - A=${NOPE}\n")
    err = fails(app)
    assert err.line == 5 and err.key == "modules.calc.environments[0]" and "undefined variable 'NOPE'" in str(err)


@pytest.mark.parametrize("ref", ["${1X}", "${A B}", "${UNCLOSED"])
def test_malformed_variable_reference(tmp_path: Path, ref: str) -> None:
    err = fails(write(tmp_path, f"name: x\nlabel: 'a {ref}'\nmodules:\n  calc: {{}}\n"))
    assert err.line == 2 and err.key == "label" and "variable reference" in str(err)


@pytest.mark.parametrize(
    ("snippet", "line", "key", "expected"),
    [
        ("    arguments:\n      max_idle_polls: many\n", 5, "modules.calc.arguments.max_idle_polls", "'many'"),
        ("    arguments:\n      heartbeat_seconds: 0\n", 5, "modules.calc.arguments.heartbeat_seconds", "greater"),
        ("    arguments:\n      conflict_action: maybe\n", 5, "modules.calc.arguments.conflict_action", "FAIL"),
        ("    arguments:\n      task_dist_mode: nowhere\n", 5, "modules.calc.arguments.task_dist_mode", "HOST-BOUND"),
        ("    parameters:\n      retry_rules: ['x']\n", 5, "modules.calc.parameters.retry_rules", "retry rule 'x'"),
        ("    environments: ['NOEQUALS']\n", 4, "modules.calc.environments", "KEY=VALUE"),
        ("    environments: ['1A=b']\n", 4, "modules.calc.environments", "variable name"),
        ("    arguments: 5\n", 4, "modules.calc.arguments", "dictionary"),
    ],
)
def test_type_errors_are_located(tmp_path: Path, snippet: str, line: int, key: str, expected: str) -> None:
    err = fails(write(tmp_path, "name: x\nmodules:\n  calc:\n" + snippet))
    assert (err.line, err.key) == (line, key) and expected in str(err), str(err)


def test_missing_name_and_modules(tmp_path: Path) -> None:
    err = fails(write(tmp_path, "label: x\nmodules:\n  calc: {}\n"))
    assert err.key == "name" and "missing required key" in str(err)
    err = fails(write(tmp_path, "name: x\n"))
    assert err.key == "modules" and "missing required key" in str(err)
    err = fails(write(tmp_path, "name: x\nmodules: {}\n"))
    assert err.line == 2 and "at least one module" in str(err)


def test_bad_module_bodies(tmp_path: Path) -> None:
    err = fails(write(tmp_path, "name: x\nmodules: 5\n"))
    assert err.line == 2 and err.key == "modules" and "mapping" in str(err)
    err = fails(write(tmp_path, "name: x\nmodules:\n  calc: [1]\n"))
    assert err.line == 3 and err.key == "modules.calc" and "mapping" in str(err)
    err = fails(write(tmp_path, "name: x\nmodules:\n  - sink_modules: []\n"))
    assert err.line == 3 and "needs a name" in str(err)
    err = fails(write(tmp_path, "name: x\nmodules:\n  calc:\n    name: other\n"))
    assert err.line == 4 and "differs" in str(err)
    err = fails(write(tmp_path, "name: x\nmodules:\n  ca/lc: {}\n"))
    assert err.line == 3 and "module name" in str(err)


def test_several_errors_report_the_first_line(tmp_path: Path) -> None:
    text = "name: x\nmodules:\n  calc:\n    arguments:\n      max_idle_polls: a\n      max_pending: b\n"
    err = fails(write(tmp_path, text))
    assert err.line == 5 and "(and 1 more)" in str(err)


# -- variables and env files ---------------------------------------------------------------------
ENV_APP = "name: x\nlabel: ${A}-${B}-${C}\nmodules:\n  calc:\n    environments: [\"D=${D:-dflt}\"]\n"


def test_env_precedence(tmp_path: Path) -> None:
    app = write(tmp_path, ENV_APP, files={"scalebox.env": "A=base\nB=base\nC=base\n", "prod.env": "B=prod\nC=prod\n"})
    assert load_pipeline(app, environ={}).label == "base-base-base"
    spec = load_pipeline(app, env_files=["prod"], environ={"C": "shell", "UNRELATED": "secret"})
    assert spec.label == "base-prod-shell"
    assert spec.modules[0].environments == {"D": "dflt"}
    assert spec.variables == {"A": "base", "B": "prod", "C": "shell"}  # env-file names only, effective values


def test_env_files_later_wins_and_paths(tmp_path: Path) -> None:
    app = write(tmp_path, ENV_APP, files={"a.env": "A=1\nB=1\nC=1\n"})
    other = tmp_path / "elsewhere" / "b.txt"
    other.parent.mkdir()
    other.write_text("B=2\nD=\n")
    spec = load_pipeline(app, env_files=["a", str(other)], environ={})
    assert spec.label == "1-2-1" and spec.modules[0].environments == {"D": "dflt"}  # :- also replaces empty
    spec = load_pipeline(app, env_files=[tmp_path / "a.env"], environ={})
    assert spec.label == "1-1-1"


def test_missing_env_file(tmp_path: Path) -> None:
    err = fails(write(tmp_path, ENV_APP), env_files=("staging",))
    assert "env file 'staging' not found" in str(err) and str(tmp_path / "staging.env") in str(err)


def test_env_file_syntax(tmp_path: Path) -> None:
    env = tmp_path / "x.env"
    env.write_text(textwrap.dedent("""\
        # comment

        export A=plain value  # trailing comment
        B="double # not a comment \\"q\\" ${A}"
        C='single ${A}'
        D=url#fragment
        E = spaced
        F=${MISSING:-fallback}
        G=${SHELL_ONLY}
    """))
    values = read_env_file(env, {"SHELL_ONLY": "from-shell"})
    assert values == {
        "A": "plain value", "B": 'double # not a comment "q" plain value', "C": "single ${A}",
        "D": "url#fragment", "E": "spaced", "F": "fallback", "G": "from-shell",
    }


@pytest.mark.parametrize(("body", "line"), [("A=1\nnot a pair\n", 2), ("A=1\n\nB='open\n", 3), ("1A=2\n", 1),
                                             ("A=${NOPE}\n", 1)])
def test_malformed_env_file(tmp_path: Path, body: str, line: int) -> None:
    app = write(tmp_path, ENV_APP, files={"scalebox.env": body})
    err = fails(app)
    assert err.file == str(tmp_path / "scalebox.env") and err.line == line


def test_expand() -> None:
    variables = {"A": "1", "EMPTY": ""}
    assert expand("${A}/${EMPTY:-d}/${EMPTY-d}/${NOPE-x}/$${A}/$A", variables) == "1/d//x/${A}/$A"
    with pytest.raises(ValueError, match="undefined"):
        expand("${NOPE}", variables)


def test_substitution_only_in_strings(tmp_path: Path) -> None:
    app = write(tmp_path, "name: x\nmodules:\n  calc:\n    arguments:\n      max_idle_polls: ${N}\n"
                          "      task_max_seconds: 2.5\n")
    spec = load_pipeline(app, environ={"N": "7"})
    assert spec.modules[0].arguments.max_idle_polls == 7 and spec.modules[0].arguments.task_max_seconds == 2.5


# -- aliases, list form, defaults ------------------------------------------------------------------
OLD_STYLE = """\
name: old
parameters:
  start_message: hello
jobs:
  first:
    sink_jobs: [second]
    variables: [X=1]
    paths: [/a:/b]
    hosts: ["h.*:3"]
    arguments:
      task_timeout_seconds: 9
    parameters:
      start_message: m
  second: {}
"""


def test_2023_aliases(tmp_path: Path) -> None:
    spec = load_pipeline(write(tmp_path, OLD_STYLE, scripts=("first", "second")), environ={})
    first = spec.module("first")
    assert spec.parameters.start_task == "hello" and first.parameters.start_task == "m"
    assert first.sink_modules == ["second"] and first.environments == {"X": "1"} and first.volumes == ["/a:/b"]
    assert first.slots == [SlotSpec(host_regex="h.*", count=3)] and first.arguments.task_max_seconds == 9


def test_modules_as_a_list(tmp_path: Path) -> None:
    text = "name: x\nmodules:\n  - name: a\n    sink_modules: [b]\n  - name: b\n    arguments:\n      max_pending: z\n"
    err = fails(write(tmp_path, text, scripts=("a", "b")))
    assert (err.line, err.key) == (7, "modules.b.arguments.max_pending")
    spec = load_pipeline(write(tmp_path, text.replace("z", "4"), scripts=("a", "b")), environ={})
    assert [m.name for m in spec.modules] == ["a", "b"] and spec.module("b").arguments.max_pending == 4


def test_default_code_path(tmp_path: Path) -> None:
    # <app dir>/<name>/ when it exists
    spec = load_pipeline(write(tmp_path / "one", "name: x\nmodules:\n  calc: {}\n", scripts=("calc",)), environ={})
    assert spec.modules[0].code_path == tmp_path / "one" / "calc"
    # else the app dir when it holds run.sh
    spec = load_pipeline(write(tmp_path / "two", "name: x\nmodules:\n  calc: {}\n", scripts=(".",)), environ={})
    assert spec.modules[0].code_path == tmp_path / "two"
    # the module dir wins even without run.sh (then: no run.sh in it)
    app = write(tmp_path / "three", "name: x\nmodules:\n  calc: {}\n", scripts=(".",))
    (tmp_path / "three" / "calc").mkdir()
    assert f"no run.sh in {tmp_path / 'three' / 'calc'}" in str(fails(app))
    # code_path relative to the app dir, not to the cwd; normalised
    spec = load_pipeline(write(tmp_path / "four", "name: x\nmodules:\n  calc:\n    code_path: ./src/../lib\n",
                               scripts=("lib",)), environ={})
    assert spec.modules[0].code_path == tmp_path / "four" / "lib"


def test_relative_pipeline_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "app", "name: x\nmodules:\n  calc: {}\n", scripts=("calc",))
    monkeypatch.chdir(tmp_path)
    spec = load_pipeline("app/app.yaml", environ={})
    assert spec.app_dir == tmp_path / "app" and spec.modules[0].code_path == tmp_path / "app" / "calc"


def test_yaml_anchors_and_merge_keys(tmp_path: Path) -> None:
    text = """\
        name: x
        modules:
          a:
            arguments: &args {max_idle_polls: 3, heartbeat_seconds: 5}
          b:
            arguments:
              <<: *args
              max_idle_polls: 4
    """
    spec = load_pipeline(write(tmp_path, text, scripts=("a", "b")), environ={})
    assert spec.module("a").arguments.max_idle_polls == 3
    assert spec.module("b").arguments.max_idle_polls == 4 and spec.module("b").arguments.heartbeat_seconds == 5


def test_string_forms(tmp_path: Path) -> None:
    text = """\
        name: 2024
        modules:
          calc:
            sink_modules: calc
            slots: "n.*:2"
            volumes: /x
            arguments: {slot_options: "always_running", conflict_action: Overwrite}
            parameters:
              retry_rules: "['1','2:3','*']"
              start_task: 17
    """
    spec = load_pipeline(write(tmp_path, text, scripts=("calc",)), environ={})
    calc = spec.modules[0]
    assert spec.name == "2024" and calc.sink_modules == ["calc"] and calc.volumes == ["/x"]
    assert calc.slots == [SlotSpec(host_regex="n.*", count=2)]
    assert calc.arguments.slot_options == ["always_running"] and calc.arguments.always_running
    assert calc.arguments.conflict_action is ConflictAction.OVERWRITE
    assert calc.parameters.retry_rules == ["1", "2:3", "*"] and calc.parameters.start_task == "17"


def test_retry_rules_string() -> None:
    assert ModuleParameters.model_validate({"retry_rules": "['1','2:3','*']"}).retry_rules == ["1", "2:3", "*"]
    assert ModuleParameters.model_validate({"retry_rules": "1, 2:3"}).retry_rules == ["1", "2:3"]
    assert ModuleParameters.model_validate({"retry_rules": [1, "*:2"]}).retry_rules == ["1", "*:2"]
    assert ModuleParameters.model_validate({"retry_rules": "[]"}).retry_rules == []


def test_as_env() -> None:
    args = ModuleArguments.model_validate({
        "task_max_seconds": 60, "slot_options": ["always_running"], "dir_limit_gb": {"/tmp": 2},
        "sleep_interval_seconds": 0.5, "conflict_action": "ignore", "semaphore": "io:2",
    })
    assert args.as_env() == {
        "TASK_MAX_SECONDS": "60", "MAX_IDLE_POLLS": "30", "SLEEP_INTERVAL_SECONDS": "0.5",
        "SLOT_OPTIONS": '["always_running"]', "HEARTBEAT_SECONDS": "10", "CONFLICT_ACTION": "IGNORE",
        "MAX_MESSAGES": "100000", "DIR_LIMIT_GB": '{"/tmp":2.0}', "SEMAPHORE": "io:2",
    }
    assert "TASK_MAX_SECONDS" not in ModuleArguments().as_env()


def test_arguments_defaults() -> None:
    args = ModuleArguments()
    assert (args.task_max_seconds, args.max_idle_polls, args.sleep_interval_seconds, args.heartbeat_seconds) == (
        None, 30, 1.0, 10.0)
    assert args.conflict_action is ConflictAction.FAIL and args.slot_options == [] and not args.always_running
    with pytest.raises(ValidationError):
        ModuleArguments.model_validate({"nope": 1})
