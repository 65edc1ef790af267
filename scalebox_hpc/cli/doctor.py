"""``scalebox doctor``: is this site ready for a pipeline? And the hidden ``doctor-probe`` its
probe job runs on a compute node."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from scalebox_hpc.cli.common import ID, _one_line, _work_root, settings

if TYPE_CHECKING:
    from scalebox_hpc.doctor import Check, Plan


@click.command("doctor", epilog="""\b
Examples:
  scalebox doctor                      # the database, Slurm, engines, a probe job on the default partition
  scalebox doctor app.yaml             # and what the pipeline names: partitions, accounts, QOS, images
  scalebox doctor --app 3 --json       # the checks of a created app, as JSON
  scalebox doctor --no-probe           # this host only (no job submitted)
  scalebox doctor --partition gpu      # probe this partition too
""")
@click.argument("pipeline_file", required=False, type=click.Path(dir_okay=False))
@click.option("--app", "app", type=ID, default=None, help="Check a created app's modules (instead of a file).")
@click.option("-e", "--env-file", "env_files", multiple=True, help="Env file(s) for the pipeline file.")
@click.option("--partition", "partitions", multiple=True, help="A partition to check and probe (repeatable).")
@click.option("--no-probe", is_flag=True, help="Do not submit the probe job: check this host only.")
@click.option("--probe-timeout", type=click.FloatRange(5, 86_400), default=300.0, show_default=True,
              help="Seconds to wait for the probe jobs (queue wait included); then they are cancelled.")
@click.option("--work-root", default=None, help="The work root the probe writes to (default SCALEBOX_WORK_ROOT).")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON (id, status, target, summary, hint).")
def doctor_cmd(pipeline_file: str | None, app: int | None, env_files: tuple[str, ...], partitions: tuple[str, ...],
               no_probe: bool, probe_timeout: float, work_root: str | None, as_json: bool) -> None:
    """Check that this site can run pipelines: the database (reachable, schema current), Slurm
    (commands answer, the partitions/accounts/QOS the pipeline names exist), the container
    engine, and a tiny probe job on a compute node (database from the node, the engine, scratch
    and work root writable, free space, CPUs/memory, GPUs, MPI's pmi2, the same Python, clock skew).

    Each check prints pass, warn, fail or skip with a hint; the exit status is 1 when one fails.
    """
    from scalebox_hpc.doctor import Settings, diagnose, exit_code

    if pipeline_file and app is not None:
        raise click.UsageError("give a PIPELINE_FILE or --app, not both")
    plan, python, root = _plan(pipeline_file, app, env_files, partitions, work_root)
    found = diagnose(Settings(plan=plan, python=python, work_root=root, probe=not no_probe,
                              probe_timeout=probe_timeout))
    if as_json:
        click.echo(json.dumps([c.as_dict() for c in found], ensure_ascii=False, indent=2))
    elif sys.stdout.isatty():
        _table(found, plan.source)
    else:
        for check in found:
            click.echo(_line(check))
    sys.exit(exit_code(found))


def _plan(pipeline_file: str | None, app: int | None, env_files: tuple[str, ...], partitions: tuple[str, ...],
          work_root: str | None) -> tuple[Plan, str, Path]:
    """The plan, the stage jobs' Python and work root: a created app's (as its first stage job
    recorded them), else this interpreter and the configured work root."""
    import shutil

    from scalebox_hpc.doctor import make_plan

    runtime = settings().runtime
    python, root = sys.executable, _work_root(work_root)
    if pipeline_file:
        from scalebox_hpc.cli.common import _load

        spec = _load(pipeline_file, env_files)
        return make_plan(spec.modules, partitions=partitions, runtime_default=runtime, which=shutil.which,
                         source=pipeline_file), python, root
    if app is None:
        return make_plan([], partitions=partitions, which=shutil.which), python, root
    from scalebox_hpc.cli.common import _db
    from scalebox_hpc.db import stages as db_stages
    from scalebox_hpc.pipeline import ModuleSpec

    with _db() as conn:
        from scalebox_hpc.cli.common import _app_id

        app_id = _app_id(conn, app)
        modules = [ModuleSpec.model_validate(row.spec) for row in db_stages.modules(conn, app_id)]
        stored = db_stages.launch_settings(conn, app_id)
    if stored is not None:
        python, root = stored[0], Path(work_root) if work_root else Path(stored[1])
    return make_plan(modules, partitions=partitions, runtime_default=runtime, which=shutil.which,
                     source=f"app {app_id}"), python, root


_MARK = {"pass": "ok", "warn": "WARN", "fail": "FAIL", "skip": "skip"}


def _line(check: Check) -> str:
    """``FAIL  db.reachable  summary  (hint: ...)``: one line a check, for logs and pipes."""
    target = f" [{check.target}]" if check.target else ""
    hint = f"  (hint: {check.hint})" if check.hint and check.status.value in ("warn", "fail") else ""
    return _one_line(f"{_MARK[check.status.value]:<4}  {check.id}{target}: {check.summary}{hint}")


def _table(found: list[Check], source: str) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    style = {"pass": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}
    table = Table(title=f"scalebox doctor{': ' + source if source else ''}", title_justify="left")
    targets = any(c.target for c in found)  # a target column only when a check has one
    for name in ("", "check", *(["target"] if targets else []), "result", "hint"):
        table.add_column(name, overflow="fold")
    for check in found:
        status = check.status.value
        table.add_row(Text(_MARK[status], style=style[status]), Text(check.id),
                      *([Text(_one_line(check.target))] if targets else []), Text(_one_line(check.summary)),
                      Text(_one_line(check.hint) if status in ("warn", "fail") else "", style="dim"))
    Console().print(table)
    counts = {s: sum(1 for c in found if c.status.value == s) for s in style}
    click.echo(", ".join(f"{n} {s}" for s, n in counts.items() if n))


@click.command("doctor-probe", hidden=True, epilog="""\b
Examples:
  scalebox doctor-probe --work-root /shared/sbx/work     # what a probe job runs, by hand on a node
  scalebox doctor-probe --work-root W --engine apptainer --image docker://busybox
""")
@click.option("--work-root", required=True, type=click.Path(file_okay=False))
@click.option("--scratch", default=None)
@click.option("--engine", default=None)
@click.option("--image", default=None)
@click.option("--code-path", default=None, type=click.Path(file_okay=False))
def probe_cmd(work_root: str, scratch: str | None, engine: str | None, image: str | None,
              code_path: str | None) -> None:
    """The probe of `scalebox doctor`'s job: prints one JSON line of facts about this node."""
    from scalebox_hpc.doctor.probe import ProbeOptions, run_probe
    from scalebox_hpc.doctor.report import render_report

    options: dict[str, Any] = {"work_root": Path(work_root), "scratch": scratch, "engine": engine, "image": image,
                               "code_path": Path(code_path) if code_path else None}
    click.echo(render_report(run_probe(ProbeOptions(**options))))


COMMANDS = (doctor_cmd, probe_cmd)
