#!/usr/bin/env bash
# Stop every test-bed service started by run-tests.sh (by PID files only) and remove the
# emulated hosts (netns.sh down: only namespaces no process is left in).
#   bash launchers/testbed/down.sh [--wipe]    --wipe also deletes the PostgreSQL cluster dir
#                                              and PgBouncer's dir
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
rc=0
bash "$HERE/slurm.sh" stop || rc=1
bash "$HERE/slurm-mc.sh" stop "${1:-}" || rc=1
bash "$HERE/pgbouncer.sh" stop "${1:-}" || rc=1  # before its backend
bash "$HERE/postgres.sh" stop "${1:-}" || rc=1
bash "$HERE/postgres2.sh" stop "${1:-}" || rc=1
bash "$HERE/postgres-tls.sh" stop "${1:-}" || rc=1
bash "$HERE/netns.sh" down || rc=1
exit "$rc"
