"""Cross-cluster primes with network separation: cluster 2's launcher cannot reach database 1.

Cluster 2's `scalebox run` runs in the emulated host sbx-h2 (launchers/testbed/netns.sh) and
reaches database 2 over the bridge (10.77.0.1). Its sink `gather` names database 1 at
127.0.0.1:55432, which inside the namespace is the namespace's own loopback: its launcher's
deliveries fail (the rows wait, with their error). A `scalebox relay` on the head node, which
reaches both databases, then delivers them: the result is 1229 on both sides.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from scalebox_hpc.db import apps, outbox
from scalebox_hpc.db.connection import connect
from tests.conftest import REPO
from tests.integration.test_netns_hosts import (  # the emulated hosts' fixtures and helpers
    Fleet,
    Host,
    fleet,  # noqa: F401  (a fixture)
    head_reachable,  # noqa: F401  (a fixture)
    hosts,  # noqa: F401  (a fixture)
    over_bridge,
    wait_for,
)
from tests.integration.test_outbox import _cli, _env, db2  # noqa: F401  (db2: a fixture)

pytestmark = [pytest.mark.pg, pytest.mark.netns]


def _count(dsn: str, sql: str, *params: object) -> int:
    with connect(dsn) as conn:
        row = conn.execute(sql, params).fetchone()  # type: ignore[arg-type]
    return int(row["n"]) if row else 0


def test_relay_host_carries_the_messages_cluster_2_cannot_deliver(
        pg_dsn: str, db2: str, hosts: list[Host], head_reachable: None,  # noqa: F811  (the fixtures)
        fleet: Fleet, tmp_path: Path) -> None:  # noqa: F811
    example = REPO / "examples" / "cross-cluster-primes"
    env1, env2 = _env(pg_dsn, tmp_path, "1"), _env(db2, tmp_path, "2")
    app1 = _cli(env1, "app", "get-next-id").stdout.strip()
    app2 = _cli(env2, "app", "get-next-id").stdout.strip()
    made2 = _cli({**env2, "CLUSTER1_SERVER": pg_dsn, "APP1_ID": app1}, "app", "create",
                 str(example / "cluster2/app.yaml"))
    assert made2.returncode == 0, made2.stderr
    made1 = _cli({**env1, "CLUSTER2_SERVER": db2, "APP2_ID": app2}, "app", "create",
                 str(example / "cluster1/app.yaml"))
    assert made1.returncode == 0, made1.stderr
    h2 = hosts[1]
    fleet.start("cluster2", h2.argv(sys.executable, "-m", "scalebox_hpc", "run", "--app", app2, "--quiet",
                                    "--timeout", "240"), {**env2, "SCALEBOX_DSN": over_bridge(db2)})
    fleet.start("cluster1", [sys.executable, "-m", "scalebox_hpc", "run", "--app", app1, "--quiet",
                             "--timeout", "240"], env1)
    calc_done = ("SELECT count(*) AS n FROM sbx_tasks WHERE app_id = %s AND status = 0")
    wait_for("calc's 10 tasks done on cluster 2", lambda: _count(db2, calc_done, int(app2)) == 10, fleet, 180)
    # cluster 2's launcher tried and could not reach database 1: nothing of it arrived there
    with connect(db2) as conn:
        wait_for("calc's 10 results waiting in cluster 2's outbox, with their error",
                 lambda: any(p["depth"] == 10 and p["last_error"] for p in outbox.remote_parts(conn, int(app2))),
                 fleet, 60)
    gathered = ("SELECT count(*) AS n FROM sbx_tasks t JOIN sbx_modules m ON m.id = t.module_id "
                "WHERE m.name = 'gather'")
    assert _count(pg_dsn, gathered) == 0
    # the head node reaches both: its relay delivers cluster 2's outbox to database 1
    fleet.start("relay", [sys.executable, "-m", "scalebox_hpc", "relay", "--interval", "0.5"], env2)
    wait_for("cluster 1's run to end", lambda: fleet.procs["cluster1"].poll() is not None, fleet, 180)
    assert fleet.procs["cluster1"].returncode == 0, fleet.logs_text()
    assert "Result is 1229" in fleet.log("cluster1", 50), fleet.logs_text()
    wait_for("cluster 2's app FINISHED (the forwarded set-finished)",
             lambda: fleet.procs["cluster2"].poll() is not None, fleet, 180)
    with connect(db2) as conn:
        row = apps.get_app(conn, int(app2))
    assert (row["status"], row["result"]) == ("FINISHED", "Result is 1229")
    assert _count(pg_dsn, gathered) == 10
    # each result received once (and the finish record cluster 2 sent back when it finished)
    assert _count(pg_dsn, "SELECT count(*) AS n FROM sbx_inbox WHERE kind = 'message'") == 10
