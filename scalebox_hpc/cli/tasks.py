"""``scalebox task``: add, list, show and retry tasks."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click

from scalebox_hpc.cli.common import (
    APP_OPTION,
    EMIT_BUFFER_ENV,
    ID,
    JSON_OPTION,
    STATUS,
    StatusType,
    _app_id,
    _check_module,
    _db,
    _dump,
    _one_line,
    terminal_safe,
)
from scalebox_hpc.errors import InvalidMessageError


@click.group()
def task() -> None:
    """Add, inspect and retry tasks."""


def _parse_headers(pairs: tuple[str, ...], headers_json: str | None) -> dict[str, Any]:
    headers: dict[str, Any] = {}
    if headers_json:
        try:
            loaded = json.loads(headers_json)
        except ValueError as exc:
            raise InvalidMessageError(f"--headers-json is not JSON: {exc}") from exc
        if not isinstance(loaded, dict):
            raise InvalidMessageError("--headers-json must be a JSON object")
        headers.update(loaded)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidMessageError(f"header {pair!r} is not k=v")
        headers[key] = value
    return headers


def _body_arg(body: str) -> str:
    """Undo Python's surrogateescape so non-UTF-8 argv bytes give a clear error."""
    from scalebox_hpc.models import validate_body

    try:
        body.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidMessageError("task body is not valid UTF-8") from exc
    return validate_body(body)


@task.command("add")
@APP_OPTION
@click.option("-m", "--module", "--sink-module", "module", default=None,
              help="Target module (inside run.sh default: the first sink; else the first module).")
@click.option("-H", "--header", "headers", multiple=True, help="Header k=v (repeatable).")
@click.option("--headers-json", default=None, help="Headers as one JSON object.")
@click.option("--file", "from_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="One task per line of this file.")
@click.option("--initial", is_flag=True, help="Create as INITIAL (-9): not claimable until activated.")
@click.argument("bodies", nargs=-1)
def task_add(
    app: int | None, module: str | None, headers: tuple[str, ...], headers_json: str | None,
    from_file: str | None, initial: bool, bodies: tuple[str, ...],
) -> None:
    """Add tasks. Inside run.sh they are buffered and committed with the task's result.

    \b
    --file FILE: one task per line that is not blank (the line as it stands is the body),
    read as a stream and sent by COPY, so a file of any length fits. A line that cannot be a
    body (NUL, over 128 KiB, not UTF-8), or under CONFLICT_ACTION=FAIL a body that exists or
    repeats, fails the whole command with its line number, and nothing is added.

    \b
    Examples:
      scalebox task add -m calc 1 2 3
      scalebox task add -m calc -H priority=5 -- -starts-with-dash
      scalebox task add -m calc --file bodies.txt   # one task per line, by COPY
      send-message BODY                          # inside run.sh: to the first sink
    """
    from scalebox_hpc.models import validate_headers

    texts = [_body_arg(b) for b in bodies]
    if not texts and not from_file:
        raise click.UsageError("give at least one BODY (or --file)")
    hdrs = validate_headers(_parse_headers(headers, headers_json))
    if os.environ.get(EMIT_BUFFER_ENV):
        if not _buffer_tasks(texts, from_file, hdrs, module):
            raise click.UsageError(f"{from_file} has no task body: every line is blank")
        return
    written = _submit_tasks(app, module, hdrs, texts, from_file, initial=initial)
    click.echo(f"added {written} task(s)")


def _submit_tasks(app: int | None, module: str | None, headers: dict[str, Any], texts: list[str],
                  from_file: str | None, *, initial: bool) -> int:
    """``task add`` outside a task: one bulk submit (the bodies, then the file's lines); rows written."""
    from scalebox_hpc.db import apps

    source = apps.BodyFile(Path(from_file)) if from_file else None
    with _db() as conn:
        app_id = _app_id(conn, app)
        _check_module(conn, app_id, module)
        done = apps.submit(conn, app_id, [apps.Batch(module, headers, texts, source)], module=module,
                           initial=initial)
    if not done.given:
        raise click.UsageError(f"{from_file} has no task body: every line is blank")
    return done.written


def _buffer_tasks(texts: list[str], from_file: str | None, headers: dict[str, Any], module: str | None) -> int:
    """Inside run.sh: append the tasks to the emit buffer, all or none (a bad line of a file
    adds nothing); returns how many. A file's lines are checked into a scratch file first,
    which then goes to the buffer in appends of whole lines: memory stays small, and the
    launcher never reads half a line."""
    from scalebox_hpc.db.bodyfile import BodyFile, read_bodies

    def line(body: str) -> bytes:
        item = {"kind": "task", "body": body, "headers": headers, "module": module}
        return (json.dumps(item, ensure_ascii=False) + "\n").encode("utf-8")

    import tempfile

    buffer = os.environ[EMIT_BUFFER_ENV]
    count = len(texts)
    with tempfile.TemporaryFile(dir=os.path.dirname(os.path.abspath(buffer))) as scratch:
        scratch.writelines(line(t) for t in texts)
        if from_file:
            for _, body in read_bodies(BodyFile(Path(from_file))):
                scratch.write(line(body))
                count += 1
        scratch.seek(0)
        with open(buffer, "ab", buffering=0) as fh:
            while chunk := b"".join(scratch.readlines(1 << 20)):
                while chunk:  # one write(2) per chunk of whole lines; a short write goes on
                    chunk = chunk[fh.write(chunk) or 0:]
    return count


@task.command("list")
@APP_OPTION
@click.option("-m", "--module", default=None, help="Only this module.")
@click.option("-s", "--status", type=STATUS, default=None,
              help="Only this status: a code (-1, 0, 124, ...) or a name: failed, ready, running, initial, ok, "
                   "timeout, stalled, system_error, emit_failed, output_invalid.")
@click.option("--failed", is_flag=True, help="Only failed tasks (exit codes, timeouts, system errors); = -s failed.")
@click.option("-n", "--limit", type=ID, default=100, show_default=True,
              help="At most this many tasks.")
@JSON_OPTION
def task_list(app: int | None, module: str | None, status: int | str | None, failed: bool, limit: int,
              as_json: bool) -> None:
    """List tasks, oldest first.

    \b
    Examples:
      scalebox task list --failed          # what went wrong (then: scalebox task show ID)
      scalebox task list -m calc -s ready  # what calc has still to do
      scalebox task list -s 124 --json     # timed-out tasks, as JSON
    """
    from scalebox_hpc.db import apps
    from scalebox_hpc.models import TaskStatus

    failed = failed or status == StatusType.FAILED
    with _db() as conn:
        app_id = _app_id(conn, app)
        _check_module(conn, app_id, module)
        if failed:
            rows = apps.list_failed_tasks(conn, app_id, module=module, limit=limit + 1)
        else:
            code = status if isinstance(status, int) else None
            rows = apps.list_tasks(conn, app_id, module=module, status=code, limit=limit + 1)
    truncated = len(rows) > limit
    rows = rows[:limit]
    if as_json:
        _dump(rows)
        return
    if rows:
        click.echo(f"{'id':>7}  {'module':<14} {'status':<14} {'tries':>5}  body")
    for r in rows:
        body = _one_line(r["body"])
        body = body if len(body) <= 60 else body[:57] + "..."
        click.echo(f"{r['id']:>7}  {_one_line(r['module']):<14} {TaskStatus.describe(r['status']):<14} "
                   f"{r['attempts']:>5}  {body}")
    if truncated:
        click.echo(f"(the first {limit} shown; -n N shows more)", err=True)
    elif not rows:
        click.echo("no tasks" + (" failed" if failed else "") + " match", err=True)


FOLLOW_POLL_SECONDS = 0.5
"""How often `task show --follow` asks (the node refreshes the tail every half heartbeat)."""
STREAMS = ("stdout", "stderr")


@task.command("show")
@JSON_OPTION
@click.option("-f", "--follow", is_flag=True,
              help="For a RUNNING task: keep printing what it prints until it ends, then its final status.")
@click.argument("task_id", type=ID)
def task_show(as_json: bool, follow: bool, task_id: int) -> None:
    """Show a task and its executions; for a RUNNING task also where it runs (host, slot), for
    how long, and the tail of its output so far (its node sends the last 2 KiB of each stream
    with every heartbeat, when it changed).

    \b
    --follow: then print what the running task prints as it comes (its stdout on stdout, its
    stderr on stderr; at the pace of its node's heartbeat), until it ends, and then its final
    status. A task that is not running is said so.

    \b
    Examples:
      scalebox task show 17
      scalebox task show --follow 17
    """
    from scalebox_hpc.db import apps
    from scalebox_hpc.models import TaskStatus

    if follow and as_json:
        raise click.UsageError("--follow prints the output as text; leave out --json")
    with _db() as conn:
        row = apps.get_task(conn, task_id)
        running = apps.running_task(conn, task_id) if row["status"] == TaskStatus.RUNNING else None
        if as_json:
            _dump({**row, **({"running": running} if running is not None else {})})
            return
        _print_task(row, running, live=not follow)
        if follow:
            _follow(conn, task_id)


def _print_task(row: dict[str, Any], running: dict[str, Any] | None, *, live: bool) -> None:
    from scalebox_hpc.models import TaskStatus

    # everything but the numbers is the task's (or another user's) text: shown without escapes
    click.echo(f"task {row['id']} ({row['module']}): {TaskStatus.describe(row['status'])}, "
               f"{row['attempts']} attempt(s)\nbody: {terminal_safe(row['body'])}\n"
               f"headers: {json.dumps(row['headers'])}")  # ASCII JSON: control characters as \u escapes
    if running is not None:
        from scalebox_hpc.cli.slots import elapsed

        where = _one_line(str(running["host"])) + (f" slot {running['seq']}" if running["seq"] is not None else "")
        ended = running["slot_status"] in ("ERROR", "EXITED", "LOST")  # back in the queue once its lease ends
        click.echo(f"running on {where} for {elapsed(running['seconds'])}"
                   + (f" (its slot is {running['slot_status']})" if ended else ""))
    for ex in row["execs"]:
        click.echo(f"- attempt {ex['attempt']} on {_one_line(str(ex['host']))}: status {ex['status']}, "
                   f"{(ex['finished_at'] - ex['started_at']).total_seconds():.3f}s")
        for name in ("stdout", "stderr", "user_text"):
            if ex[name]:
                click.echo(f"  {name}: " + terminal_safe(ex[name]).rstrip().replace("\n", "\n    "))
    output = (running or {}).get("output") or {}
    if live and any((output.get(name) or {}).get("text") for name in STREAMS):
        click.echo(f"output so far (attempt {row['attempts']}, its last KiB; `scalebox task show --follow "
                   f"{row['id']}` follows it):")
        for name in STREAMS:
            text = (output.get(name) or {}).get("text")
            if text:
                click.echo(f"  {name}: " + terminal_safe(str(text)).rstrip().replace("\n", "\n    "))


class _Follower:
    """What `--follow` printed of each stream: the offset printed up to, and its last characters
    (to find the rest in the execution record once the task has ended)."""

    def __init__(self) -> None:
        self.printed = dict.fromkeys(STREAMS, 0)
        self.seen = dict.fromkeys(STREAMS, "")

    def show(self, output: dict[str, Any] | None) -> None:
        """Print what is new in one snapshot of the live output."""
        from scalebox_hpc.launcher.livetail import new_text

        for name in STREAMS:
            new = new_text((output or {}).get(name), self.printed[name])
            err = name == "stderr"
            if new.skipped > 0:
                click.echo(f"[scalebox: {new.skipped} byte(s) of its {name} not shown]", err=err)
            elif new.skipped < 0:
                click.echo(f"[scalebox: its {name} began anew]", err=err)
            self._echo(name, new.text)
            self.printed[name] = new.printed

    def finish(self, ex: dict[str, Any] | None) -> None:
        """Print the end of the recorded output that the live tail had not shown yet."""
        from scalebox_hpc.launcher.livetail import sanitize

        for name in STREAMS:
            final = sanitize(str((ex or {}).get(name) or "").encode("utf-8"))
            key = self.seen[name]
            at = final.rfind(key) if key else 0
            if at < 0:
                click.echo(f"[scalebox: the end of its {name}:]", err=name == "stderr")
                at = 0
            else:
                at += len(key)
            self._echo(name, final[at:])

    def _echo(self, name: str, text: str) -> None:
        if text:
            click.echo(terminal_safe(text), nl=False, err=name == "stderr")
            self.seen[name] = (self.seen[name] + text)[-200:]


def _follow(conn: Any, task_id: int) -> None:
    """Print the running task's output as its node sends it, until the task is not RUNNING
    (or runs again as another attempt); then the rest of its output and its final status."""
    import time

    from scalebox_hpc.db import apps
    from scalebox_hpc.models import TaskStatus

    conn.commit()  # every poll in a transaction of its own (not one snapshot of now() for ever)
    state = apps.task_state(conn, task_id)
    if state["status"] != TaskStatus.RUNNING:
        click.echo(f"task {task_id} is not running ({TaskStatus.describe(state['status'])}): nothing to follow",
                   err=True)
        return
    attempt, follower = state["attempts"], _Follower()
    click.echo(f"following the output of task {task_id} (attempt {attempt}; Ctrl-C stops following):")
    try:
        while state["status"] == TaskStatus.RUNNING and state["attempts"] == attempt:
            follower.show(state["output"])
            time.sleep(FOLLOW_POLL_SECONDS)
            state = apps.task_state(conn, task_id)
    except KeyboardInterrupt:
        click.echo("", err=True)
        raise SystemExit(130) from None
    with conn.transaction():
        row = apps.get_task(conn, task_id)
    ex = next((e for e in reversed(row["execs"]) if e["attempt"] == attempt), None)
    follower.finish(ex)
    status = row["status"]
    if status == TaskStatus.OK or TaskStatus.is_failure(status):
        click.echo(f"task {task_id} ended: {TaskStatus.describe(status)}")
    else:
        click.echo(f"task {task_id} is {TaskStatus.describe(status)} again: attempt {attempt} did not end here"
                   + (f" (status {ex['status']})" if ex else " (its run was given back or lost)"))


@task.command("retry")
@APP_OPTION
@click.option("--failed", is_flag=True, help="Every failed task of the app (exit codes, timeouts, errors).")
@click.option("-s", "--status", "status", type=STATUS, default=None,
              help="Every task of the app with this status: a code or a name (timeout, stalled, ...).")
@click.option("-m", "--module", default=None, help="With --failed/--status: only this module.")
@click.argument("task_ids", type=ID, nargs=-1)
def task_retry(app: int | None, failed: bool, status: int | str | None, module: str | None,
               task_ids: tuple[int, ...]) -> None:
    """Make finished tasks READY again: by id, or all --failed, or all with --status CODE.

    \b
    Examples:
      scalebox task retry 17 18
      scalebox task retry --failed -m calc
      scalebox task retry --status timeout
    """
    from scalebox_hpc.db import apps
    from scalebox_hpc.models import TaskStatus

    if status == StatusType.FAILED:
        failed, status = True, None
    if not task_ids and not failed and status is None:
        raise click.UsageError("give TASK_IDS, --failed or --status CODE")
    with _db() as conn:
        ids = list(task_ids)
        if failed or status is not None:
            app_id = _app_id(conn, app)
            _check_module(conn, app_id, module)
            code = status if isinstance(status, int) else None
            rows = apps.list_tasks(conn, app_id, module=module, status=code, limit=10_000_000)
            ids += [r["id"] for r in rows if not failed or TaskStatus.is_failure(r["status"])]
        done = apps.retry_tasks(conn, ids)
    click.echo(f"requeued {len(done)} task(s)")
