#!/usr/bin/env bash
# THE test command: brings up the real test-bed (PostgreSQL and PgBouncer, a second PostgreSQL with TLS + scram
# and two OS users (postgres-tls.sh), a 4-node Slurm cluster, a second
# Slurm with slurmdbd accounting (two clusters, QOS limits), rsync, tmux, Chromium,
# Apptainer, Podman, 3 emulated hosts in network namespaces, the project venv), runs the static
# checks and then pytest.
#
#   bash launchers/testbed/run-tests.sh [PYTEST ARGS...]   e.g. tests/unit -k queue -x
#   bash launchers/testbed/run-tests.sh --down             stop the test-bed services (= down.sh)
#
# Debian 12, as root; needs no TTY and no stdin. Idempotent and incremental: a second run
# skips what is already installed/running. The services are left running afterwards.
# Env:
#   SCALEBOX_TESTBED_SKIP_LINT=1   skip ruff/mypy/lint-imports/shellcheck (pytest only)
#   CI=true                        tests whose component is unavailable fail instead of skipping
#   SCALEBOX_TEST_WORKERS=3        pytest-xdist workers (0: the suite in one process, as before)
#   SCALEBOX_TESTBED_NETNS_HOSTS=3 emulated hosts sbx-h1..N (netns.sh; 0 = none)
#   plus the knobs of postgres.sh / postgres-tls.sh / pgbouncer.sh / slurm.sh / slurm-mc.sh / apptainer.sh / podman.sh / venv.sh
# Exit code: pytest's; 1 if a static check failed; 5 (no tests collected) is reported as
# a failure.
set -euo pipefail
exec </dev/null
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PROJECT=$(cd "$HERE/../.." && pwd)
export PROJECT

if [ "${1:-}" = --down ]; then
  exec bash "$HERE/down.sh" "${@:2}"
fi

T_ALL=$(date +%s.%N)
TIMINGS=()
PHASE_OPEN=0
phase_start() { PHASE=$1; PHASE_OPEN=1; T0=$(date +%s.%N); echo "[testbed] ==> $PHASE" >&2; }
phase_end() {  # phase_end [STATUS]
  local dt
  PHASE_OPEN=0
  dt=$(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
  TIMINGS+=("$(printf '%-14s %7s s  %s' "$PHASE" "$dt" "${1:-ok}")")
  echo "[testbed] <== $PHASE: ${dt} s ${1:-ok}" >&2
}
summary() {
  local rc=$? total
  [ "$PHASE_OPEN" = 1 ] && phase_end "FAILED (exit $rc)"
  total=$(awk -v a="$T_ALL" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}')
  {
    echo "[testbed] ---- timings ----"
    for t in "${TIMINGS[@]}"; do echo "[testbed] $t"; done
    echo "[testbed] total          ${total} s  (exit $rc)"
  } >&2
}
trap summary EXIT
# a stopped run (a CI timeout, ^C) exits as the signal says; the summary then shows that code,
# not the status of the last command before the signal (it printed "pytest FAILED (exit 0)")
trap 'exit 130' INT
trap 'exit 143' TERM

[ "$(id -u)" = 0 ] || { echo "[testbed] run-tests.sh must run as root (it installs packages and starts daemons)" >&2; exit 1; }

phase_start venv
VENV=$(bash "$HERE/venv.sh" | tail -1)
export VIRTUAL_ENV=$VENV PATH="$VENV/bin:$PATH"
phase_end

# before PostgreSQL: a server started while the bridge exists also listens on 10.77.0.1.
# Not fatal (a container without CAP_NET_ADMIN cannot have them): the tests needing the hosts
# then skip with the reason, or fail under CI=true.
NETNS_HOSTS=${SCALEBOX_TESTBED_NETNS_HOSTS:-3}
if [ "$NETNS_HOSTS" != 0 ]; then
  phase_start netns
  if bash "$HERE/netns.sh" up "$NETNS_HOSTS"; then phase_end; else phase_end "FAILED (tests needing the hosts will say why)"; fi
fi

phase_start postgres
PG_OUT=$(bash "$HERE/postgres.sh" start)
echo "$PG_OUT"
phase_end

# cluster 2's database (one database per cluster: the outbox tests). Not fatal: they skip, or fail under CI=true.
phase_start postgres2
if PG2_OUT=$(bash "$HERE/postgres2.sh" start); then echo "$PG2_OUT"; phase_end; else PG2_OUT=""; phase_end "FAILED (the outbox tests will say why)"; fi

# PgBouncer (transaction mode) in front of that server, for tests/pgbouncer. Not fatal (no
# package reachable, say): without its DSN those tests skip with the reason, or fail under CI=true.
phase_start pgbouncer
if PGB_OUT=$(bash "$HERE/pgbouncer.sh" start); then echo "$PGB_OUT"; phase_end; else PGB_OUT=""; phase_end "FAILED (tests/pgbouncer will say why)"; fi

# the second PostgreSQL (TLS + scram, users sbx_alice/sbx_bob for root/sbxtest), for tests/security
phase_start postgres-tls
if TLS_OUT=$(bash "$HERE/postgres-tls.sh" start); then echo "$TLS_OUT"; phase_end; else TLS_OUT=""; phase_end "FAILED (tests/security will say why)"; fi

phase_start slurm
bash "$HERE/slurm.sh" start
phase_end

# the second Slurm, with accounting (slurmdbd + MariaDB): QOS limits and two clusters. Not fatal:
# without its client config those tests skip with the reason, or fail under CI=true.
phase_start slurm-mc
if MC_OUT=$(bash "$HERE/slurm-mc.sh" start); then echo "$MC_OUT"; phase_end; else MC_OUT=""; phase_end "FAILED (the QOS tests will say why)"; fi

phase_start apptainer
bash "$HERE/apptainer.sh" install
phase_end

phase_start podman
bash "$HERE/podman.sh" install
phase_end

phase_start rsync
bash "$HERE/rsync.sh" install
phase_end

phase_start tmux
bash "$HERE/tmux.sh" install
phase_end

# headless Chromium for the report's rendering test. Not fatal: without it that test skips with
# the reason, or fails under CI=true.
phase_start chromium
if bash "$HERE/chromium.sh" install; then phase_end; else phase_end "FAILED (the report rendering test will say why)"; fi

SCALEBOX_TEST_DSN=$(sed -n 's/^DSN=//p' <<<"$PG_OUT")
export SCALEBOX_TEST_DSN
SCALEBOX_TEST_DSN2=$(sed -n 's/^DSN=//p' <<<"$PG2_OUT")
if [ -n "$SCALEBOX_TEST_DSN2" ]; then export SCALEBOX_TEST_DSN2; else unset SCALEBOX_TEST_DSN2; fi
SCALEBOX_TEST_PGBOUNCER_DSN=$(sed -n 's/^export SCALEBOX_TEST_PGBOUNCER_DSN=//p' <<<"$PGB_OUT")
SCALEBOX_TEST_PGBOUNCER_DIRECT_DSN=$(sed -n 's/^export SCALEBOX_TEST_PGBOUNCER_DIRECT_DSN=//p' <<<"$PGB_OUT")
if [ -n "$SCALEBOX_TEST_PGBOUNCER_DSN" ]; then
  export SCALEBOX_TEST_PGBOUNCER_DSN SCALEBOX_TEST_PGBOUNCER_DIRECT_DSN
else
  unset SCALEBOX_TEST_PGBOUNCER_DSN SCALEBOX_TEST_PGBOUNCER_DIRECT_DSN
fi
SCALEBOX_TEST_PGTLS_DIR=$(sed -n 's/^export SCALEBOX_TEST_PGTLS_DIR=//p' <<<"$TLS_OUT")
if [ -n "$SCALEBOX_TEST_PGTLS_DIR" ]; then export SCALEBOX_TEST_PGTLS_DIR; else unset SCALEBOX_TEST_PGTLS_DIR; fi
SCALEBOX_TEST_SLURM_MC_CONF=$(sed -n 's/^export SCALEBOX_TEST_SLURM_MC_CONF=//p' <<<"$MC_OUT")
if [ -n "$SCALEBOX_TEST_SLURM_MC_CONF" ]; then export SCALEBOX_TEST_SLURM_MC_CONF; else unset SCALEBOX_TEST_SLURM_MC_CONF; fi
export SCALEBOX_TEST_SLURM_NODES
SCALEBOX_TEST_SLURM_NODES=$(seq -f 'node%g' -s, 1 "${SCALEBOX_TESTBED_SLURM_NODES:-4}")
SCALEBOX_TEST_APPTAINER=$(command -v apptainer)
export SCALEBOX_TEST_APPTAINER
export SCALEBOX_TEST_MPI_PY=$VENV/bin/python
if [ "$NETNS_HOSTS" != 0 ]; then
  SCALEBOX_TEST_NETNS_HOSTS=$(seq -f 'sbx-h%g' -s, 1 "$NETNS_HOSTS")
  export SCALEBOX_TEST_NETNS_HOSTS
fi
env | grep '^SCALEBOX_TEST_' | sort | sed 's/^/export /'

cd "$PROJECT"
LINT_FAILED=()
if [ "${SCALEBOX_TESTBED_SKIP_LINT:-0}" != 1 ]; then
  lint_dirs=()
  for d in scalebox_hpc tests benchmarks; do [ -d "$d" ] && lint_dirs+=("$d"); done
  phase_start ruff
  if ruff check "${lint_dirs[@]}"; then phase_end; else phase_end FAILED; LINT_FAILED+=(ruff); fi
  phase_start mypy
  if mypy; then phase_end; else phase_end FAILED; LINT_FAILED+=(mypy); fi
  phase_start lint-imports
  if lint-imports; then phase_end; else phase_end FAILED; LINT_FAILED+=(lint-imports); fi
  phase_start shellcheck  # every tracked shell script (tests/unit/test_shell_lint.py checks the list)
  if bash "$HERE/shellcheck.sh" --install; then phase_end; else phase_end FAILED; LINT_FAILED+=(shellcheck); fi
fi

phase_start pytest
rc=0
# on SCALEBOX_TEST_WORKERS workers (pytest-xdist; 0: in this process), tests that share a
# machine-wide resource grouped onto one worker (tests/conftest.py)
pytest -q --durations=30 -n "${SCALEBOX_TEST_WORKERS:-3}" --dist loadgroup "$@" || rc=$?
if [ "$rc" = 5 ]; then
  phase_end "FAILED (no tests collected)"
  echo "[testbed] FAILURE: pytest collected no tests (exit 5) for: ${*:-<default testpaths>}" >&2
elif [ "$rc" = 0 ]; then
  phase_end
else
  phase_end "FAILED (exit $rc)"
fi

if [ ${#LINT_FAILED[@]} -gt 0 ]; then
  echo "[testbed] FAILURE: static checks failed: ${LINT_FAILED[*]}" >&2
  [ "$rc" = 0 ] && rc=1
fi
exit "$rc"
