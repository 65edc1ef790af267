#!/usr/bin/env bash
# The second PostgreSQL server of the test-bed: cluster 2's database in the "one database per
# cluster" tests (issue 15: remote sinks, the outbox relay). postgres.sh with its own dir, port
# and PID file, so it can be stopped and started on its own (the tests stop it for a while).
#
#   bash launchers/testbed/postgres2.sh start    # idempotent; prints DSN=...
#   bash launchers/testbed/postgres2.sh status   # exit 0 when running
#   bash launchers/testbed/postgres2.sh stop [--wipe]
#
# Env (optional):
#   SCALEBOX_TESTBED_PG2_DIR=/tmp/scalebox-testbed-pg2   cluster dir (data/, socket, log)
#   SCALEBOX_TESTBED_PG2_PORT=55436                      TCP port on 127.0.0.1 (and 10.77.0.1)
#   SCALEBOX_TESTBED_PG2_DB=scalebox2                    database created on start
set -euo pipefail
export SCALEBOX_TESTBED_PG_DIR=${SCALEBOX_TESTBED_PG2_DIR:-/tmp/scalebox-testbed-pg2}
export SCALEBOX_TESTBED_PG_PORT=${SCALEBOX_TESTBED_PG2_PORT:-55436}
export SCALEBOX_TESTBED_PG_DB=${SCALEBOX_TESTBED_PG2_DB:-scalebox2}
exec bash "$(dirname "${BASH_SOURCE[0]}")/postgres.sh" "$@"
