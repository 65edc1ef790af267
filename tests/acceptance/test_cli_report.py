"""`scalebox report` and `scalebox metrics` on real runs, as a user runs them (subprocesses
against the test PostgreSQL): the report's numbers against SQL counts, hostile task output
kept inert, a running app's snapshot, headless Chromium rendering the page, and the metrics read
back by the official Prometheus parser (hostile module and host names included)."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.acceptance.test_cli import REPO, sbx
from tests.components import need
from tests.helpers import write_app

pytestmark = pytest.mark.pg

HOSTILE_LINE = '<script>alert("pwned")</script><img src=x onerror=alert(1)>'


def _hostile_app(tmp_path: Path, cli_env: dict[str, str], tasks: int = 24) -> str:
    """An app of one module whose run.sh fails every 4th task with hostile stderr (exit 3,
    retried once), on two slots; returns its id, after its launcher went idle."""
    app = write_app(tmp_path / "hostile", """
        name: hostile
        modules:
          work:
            parameters: {retry_rules: ['3:1']}
            arguments: {max_idle_polls: 2, sleep_interval_seconds: 0.2}
            slots: [".*:2"]
    """, {"work/run.sh": f"""
        case "$1" in
          *[048]) printf 'some context\\n\\033]0;retitled\\007%s\\n' '{HOSTILE_LINE}' >&2; exit 3 ;;
        esac
        sleep 0.05
    """})
    app_id = sbx(cli_env, "app", "create", str(app)).stdout.strip()
    bodies = tmp_path / "bodies.txt"
    bodies.write_text("".join(f"t{i:02d}\n" for i in range(tasks)))
    sbx(cli_env, "task", "add", "--app", app_id, "--file", str(bodies))
    sbx(cli_env, "launcher", "--app", app_id)
    return app_id


def _sql(cli_env: dict[str, str], text: str, *params: object) -> list[tuple[object, ...]]:
    with psycopg.connect(cli_env["SCALEBOX_DSN"], autocommit=True) as conn:
        cur = conn.execute(text, params)  # type: ignore[arg-type]
        return cur.fetchall() if cur.description else []


def _cells(page: str, section: str) -> list[list[str]]:
    """The table cells of one section, row by row (tags stripped)."""
    body = page.split(f'<section id="{section}">', 1)[1].split("</section>", 1)[0]
    rows = re.findall(r"<tr>(.*?)</tr>", body)
    return [[re.sub(r"<[^>]+>", "", c) for c in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", r)] for r in rows]


def test_report_of_a_run_with_failures(cli_env: dict[str, str], tmp_path: Path) -> None:
    app_id = _hostile_app(tmp_path, cli_env)
    out = tmp_path / "report.html"
    sbx(cli_env, "report", "--app", app_id, "-o", str(out))
    page = out.read_text()
    for sid in ("summary", "throughput", "queue", "timeline", "durations", "failures", "retries", "locality",
                "stage-jobs", "core-hours"):
        assert f'<section id="{sid}">' in page, sid
    [(tasks, ok, failed, execs, failed_execs)] = _sql(cli_env, """
        SELECT count(*), count(*) FILTER (WHERE status = 0), count(*) FILTER (WHERE status = 3),
               (SELECT count(*) FROM sbx_task_execs e JOIN sbx_tasks x ON x.id = e.task_id WHERE x.app_id = %s),
               (SELECT count(*) FROM sbx_task_execs e JOIN sbx_tasks x ON x.id = e.task_id
                WHERE x.app_id = %s AND e.status = 3)
        FROM sbx_tasks WHERE app_id = %s""", int(app_id), int(app_id), int(app_id))
    assert (tasks, ok, failed, execs, failed_execs) == (24, 17, 7, 31, 14)  # 7 failing tasks, each tried twice
    summary = {r[0]: r for r in _cells(page, "summary") if len(r) == 7}
    assert summary["work"][1:] == ["24", "0", "0", "0", "17", "7"]
    failures = _cells(page, "failures")
    assert ["work", "EXIT_3", "3", "7", "14"] in failures
    # the hostile line is listed as text, 14 times (every failed execution), and is inert
    [line_row] = [r for r in failures if r and r[-1].startswith("&lt;script")]
    assert line_row[2] == "14"
    assert "<script" not in page.lower() and "onerror=alert" not in page.replace("onerror=alert(1)&gt;", "")
    assert "\x1b" not in page and "retitled" not in page  # the terminal title sequence went, whole
    retries = _cells(page, "retries")
    assert ["work", "7", "7", "0", "0"] in retries
    assert f"{execs} executions" in page and "sampled" not in page
    assert page.count("<rect") >= execs  # one bar per execution (not sampled) plus histogram bars
    assert "Snapshot: the app is still running" in page  # RUNNING: nobody set it finished
    assert "not recorded" not in page  # the executions carry their CPU time (migration 0014)
    [work] = [r for r in _cells(page, "core-hours") if r and r[0] == "work"]
    assert float(work[2]) >= 0.0  # a number of core-hours, not "not recorded"


def test_report_of_a_finished_app_and_defaults(cli_env: dict[str, str], tmp_path: Path) -> None:
    proc = sbx(cli_env, "run", str(REPO / "examples/app-primes/app.yaml"))
    assert proc.stdout.strip().splitlines()[-1] == "Result is 1229"
    proc = subprocess.run([sys.executable, "-m", "scalebox_hpc", "report"], env=cli_env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=True)
    [made] = list(tmp_path.glob("report-app-*.html"))  # the newest app, default file name
    page = made.read_text()
    assert "the app has finished" in page and "Snapshot" not in page and "Result is 1229" in page
    summary = {r[0]: r[1:] for r in _cells(page, "summary") if len(r) == 7 and r[0] != "module"}
    assert summary == {"scatter": ["1", "0", "0", "0", "1", "0"], "calc": ["10", "0", "0", "0", "10", "0"],
                       "gather": ["10", "0", "0", "0", "10", "0"]}
    assert "No failed task or execution." in page
    assert "21 executions" in page
    assert proc.stderr.strip().startswith(made.name)
    # positional id and --app agree; '-' writes to standard output
    assert sbx(cli_env, "report", "1", "-o", "-").stdout.startswith("<!DOCTYPE html>")
    bad = sbx(cli_env, "report", "1", "--app", "2", check=False)
    assert bad.returncode == 2 and "different apps" in bad.stderr


def test_report_on_an_empty_database(cli_env: dict[str, str], tmp_path: Path) -> None:
    proc = sbx(cli_env, "report", check=False)
    assert proc.returncode == 1 and "no apps yet" in proc.stderr and "Traceback" not in proc.stderr
    # metrics of no app: still a valid exposition (only the timestamp)
    families = list(text_string_to_metric_families(sbx(cli_env, "metrics").stdout))
    assert [f.name for f in families if f.samples] == ["scalebox_metrics_generated_timestamp_seconds"]
    proc = sbx(cli_env, "metrics", "-o", str(tmp_path / "missing" / "x.prom"), check=False)
    assert proc.returncode == 1 and "cannot write" in proc.stderr and "Traceback" not in proc.stderr


def _png_pixels(path: Path) -> tuple[int, int, bytes]:
    """Width, height and the decompressed scanlines of a PNG (no imaging library needed)."""
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(raw):
        length, kind = struct.unpack(">I4s", raw[pos:pos + 8])
        chunk = raw[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            width, height = struct.unpack(">II", chunk[:8])
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    return width, height, zlib.decompress(idat)


def test_report_renders_in_headless_chromium(cli_env: dict[str, str], tmp_path: Path) -> None:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        need("chromium", "`chromium` not on PATH (bash launchers/testbed/chromium.sh install)")
    app_id = _hostile_app(tmp_path, cli_env, tasks=12)
    page = tmp_path / "report.html"
    sbx(cli_env, "report", "--app", app_id, "-o", str(page))
    png = tmp_path / "report.png"
    profile = tmp_path / "chromium-profile"
    env = {**os.environ, "HOME": str(tmp_path)}
    proc = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           f"--user-data-dir={profile}", "--hide-scrollbars", "--window-size=1000,2400",
                           f"--screenshot={png}", page.as_uri()],
                          env=env, capture_output=True, text=True, timeout=180, check=False)
    assert png.is_file(), f"no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}"
    width, height, pixels = _png_pixels(png)
    assert (width, height) == (1000, 2400)
    # not a blank page: many distinct byte values, and the charts' colours are there
    assert len(set(pixels)) > 100 and png.stat().st_size > 30_000
    print(f"chromium rendered {png.stat().st_size} bytes of PNG, {len(set(pixels))} distinct byte values")


def _metrics(text: str) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
        out.setdefault(f"type:{fam.name}", {})[()] = 1.0 if fam.type == "counter" else 0.0
    return out


def test_metrics_of_a_real_app_with_hostile_names(cli_env: dict[str, str], tmp_path: Path) -> None:
    app_id = _hostile_app(tmp_path, cli_env, tasks=12)
    weird_module = 'wo"rk\\mod\nule'
    weird_host = 'ho"st\\1\nx'
    _sql(cli_env, "UPDATE sbx_modules SET name = %s WHERE app_id = %s AND name = 'work'", weird_module, int(app_id))
    # a live slot on a hostile host name, a stage job and READY tasks, as a running fleet would leave them
    _sql(cli_env, """INSERT INTO sbx_slots (module_id, host, seq, status, heartbeat_at)
                     SELECT id, %s, 0, 'RUNNING', now() FROM sbx_modules WHERE app_id = %s""", weird_host, int(app_id))
    _sql(cli_env, """INSERT INTO sbx_stage_jobs (app_id, module_id, slurm_job_id, state)
                     SELECT app_id, id, '4711', 'RUNNING' FROM sbx_modules WHERE app_id = %s""", int(app_id))
    _sql(cli_env, """INSERT INTO sbx_tasks (app_id, module_id, body, created_at)
                     SELECT app_id, id, 'late-' || i, now() - interval '90 seconds'
                     FROM sbx_modules, generate_series(1, 3) AS i WHERE app_id = %s""", int(app_id))
    text = sbx(cli_env, "metrics", "--app", app_id).stdout
    m = _metrics(text)
    lab = (("app", app_id), ("module", weird_module))
    assert m["type:scalebox_task_executions"][()] == 1.0 and m["type:scalebox_tasks_created"][()] == 1.0
    assert m["type:scalebox_queue_depth"][()] == 0.0
    assert m["scalebox_tasks_created_total"][lab] == 15
    assert m["scalebox_tasks"][(*lab[:1], lab[1], ("status", "ok"))] == 8
    assert m["scalebox_tasks"][(*lab[:1], lab[1], ("status", "exit_3"))] == 4
    assert m["scalebox_tasks_finished_total"][(*lab, ("outcome", "failed"))] == 4
    assert m["scalebox_task_executions_total"][(*lab, ("status", "exit_3"))] == 8
    assert m["scalebox_task_executions_total"][(*lab, ("status", "ok"))] == 8
    assert m["scalebox_queue_depth"][lab] == 3
    assert 80 < m["scalebox_oldest_ready_age_seconds"][lab] < 3600
    assert m["scalebox_live_slots"][(("app", app_id), ("host", weird_host), ("module", weird_module))] == 1
    assert m["scalebox_stage_jobs"][(*lab, ("state", "running"))] == 1
    assert m["scalebox_task_execution_seconds_total"][lab] > 0
    # -o: the same text, written atomically; without --app: the RUNNING apps only
    target = tmp_path / "textfile" / "scalebox.prom"
    target.parent.mkdir()
    sbx(cli_env, "metrics", "--app", app_id, "-o", str(target))
    assert _metrics(target.read_text())["scalebox_tasks_created_total"][lab] == 15
    assert [p.name for p in target.parent.iterdir()] == ["scalebox.prom"]
    sbx(cli_env, "app", "set-finished", "--app", app_id, "done")
    other = json.loads(sbx(cli_env, "app", "create", "--json", str(tmp_path / "hostile" / "app.yaml")).stdout)["app_id"]
    apps = {dict(k)["app"] for k in _metrics(sbx(cli_env, "metrics", "--recent", "0").stdout)["scalebox_app_info"]}
    assert apps == {str(other)}
    apps = {dict(k)["app"] for k in _metrics(sbx(cli_env, "metrics").stdout)["scalebox_app_info"]}
    assert apps == {str(other), app_id}  # finished a moment ago: still exported (--recent 600)
