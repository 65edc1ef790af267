"""The report and the metrics on a synthetic app of many tasks (benchmarks/report.py's fill, in
SQL): the numbers the report shows agree with direct SQL counts, the rebuilt queue depth ends
at today's READY count, and the timeline is a sample of at most 5000 bars. The benchmark
itself runs here at a small size, so it cannot rot; its timings are printed, not asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.pg

REPO = Path(__file__).resolve().parents[2]


def test_report_numbers_match_sql_at_scale(pg_dsn: str, tmp_path: Path) -> None:
    env = {"SCALEBOX_DSN": pg_dsn, "SCALEBOX_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
    page = tmp_path / "big.html"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks/report.py"), "--tasks", "30000", "--repeat", "1",
                           "--html", str(page)], env=env, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    print(json.dumps({k: out[k] for k in ("tasks", "fill_s", "report_s", "metrics_s", "html_bytes")}))
    sql, shown = out["sql_counts"], out["report_counts"]
    assert sql["tasks"] == 30000 and sql["ready"] > 0 and sql["failed"] > 0 and sql["execs"] > 30000
    assert {k: shown[k] for k in sql} == sql
    assert shown["queue_depth_now"] == sql["ready"]
    assert out["timeline_stride"] > 1 and out["timeline_bars"] <= 5000
    text = page.read_text()
    assert f"sampled: one execution in {out['timeline_stride']} is drawn" in text
    assert "&lt;bad&gt; input" in text and "<bad>" not in text  # the synthetic stderr, escaped
