"""`scalebox run` of examples/app-primes end to end with SCALEBOX_DSN pointing at PgBouncer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pgbouncer.conftest import Bouncer

pytestmark = [pytest.mark.pg, pytest.mark.pgbouncer]

REPO = Path(__file__).resolve().parents[2]
SCALEBOX = [sys.executable, "-m", "scalebox_hpc"]


def sbx(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([*SCALEBOX, *args], env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"scalebox {args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.mark.parametrize("setup", ["pooler-listen-direct", "pooler-polling-only", "undeclared-pooler"])
def test_app_primes_through_pgbouncer(bouncer: Bouncer, tmp_path: Path, setup: str) -> None:
    """The main job through the pooler: with SCALEBOX_DB_POOLER=transaction and the listener on
    the direct DSN, with polling only, and with nothing declared (connect() recognises the
    pooler by its refusal of ``options``): the same exact result and counts as directly."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "SCALEBOX_"))}
    env.update({
        "SCALEBOX_DSN": bouncer.dsn,
        "SCALEBOX_HOME": str(tmp_path / "home"),
        "SCALEBOX_WORK_ROOT": str(tmp_path / "work"),
    })
    if setup != "undeclared-pooler":
        env["SCALEBOX_DB_POOLER"] = "transaction"
    if setup == "pooler-listen-direct":
        env["SCALEBOX_LISTEN_DSN"] = bouncer.direct
    # -v: the log is configured before the first connection, so the warning shows
    proc = sbx(env, "-v", "run", str(REPO / "examples/app-primes/app.yaml"))
    assert proc.stdout.strip().splitlines()[-1] == "Result is 1229"
    undeclared = setup == "undeclared-pooler"
    assert ("refuses the `options` startup parameter" in proc.stderr) == undeclared
    assert ("no LISTEN: postgresql://postgres@127.0.0.1" in proc.stderr) == undeclared  # the listener saw it too
    assert "Error" not in proc.stderr, proc.stderr
    status = json.loads(sbx(env, "status", "--json").stdout)
    by_module = {m["module"]: m for m in status["modules"]}
    assert (by_module["scatter"]["ok"], by_module["calc"]["ok"], by_module["gather"]["ok"]) == (1, 10, 10)
    assert all(m["failed"] == 0 for m in status["modules"])
    assert status["app"]["status"] == "FINISHED"
