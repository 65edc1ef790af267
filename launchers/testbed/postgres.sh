#!/usr/bin/env bash
# Throw-away PostgreSQL server for the tests (Debian 12, root, no systemd).
#
#   bash launchers/testbed/postgres.sh start    # idempotent; prints DSN=...
#   bash launchers/testbed/postgres.sh status   # exit 0 when running
#   bash launchers/testbed/postgres.sh stop [--wipe]
#
# Uses Debian's server binaries (/usr/lib/postgresql/<ver>/bin) and installs the
# `postgresql` package when there are none (without creating Debian's default
# cluster). initdb refuses to run as root, so the cluster is owned and run by the
# `postgres` OS user. Trust authentication, fsync off: test data only.
#
# Env (optional):
#   SCALEBOX_TESTBED_PG_DIR=/tmp/scalebox-testbed-pg   cluster dir (data/, socket, log)
#   SCALEBOX_TESTBED_PG_PORT=55432                     TCP port on 127.0.0.1
#   SCALEBOX_TESTBED_PG_DB=scalebox                    database created on start
# Stop is by PID file only (pg_ctl stop signals the PID in data/postmaster.pid).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DIR=${SCALEBOX_TESTBED_PG_DIR:-/tmp/scalebox-testbed-pg}
PORT=${SCALEBOX_TESTBED_PG_PORT:-55432}
DB=${SCALEBOX_TESTBED_PG_DB:-scalebox}
OSUSER=postgres
DSN="postgresql://postgres@127.0.0.1:$PORT/$DB"

pgbin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }
as_pg() { (cd / && runuser -u "$OSUSER" -- "$@"); }
running() { [ -n "$PGBIN" ] && [ -f "$DIR/data/postmaster.pid" ] && as_pg "$PGBIN/pg_ctl" -D "$DIR/data" status >/dev/null 2>&1; }
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; }
psql_() { "$PGBIN/psql" -X -h 127.0.0.1 -p "$PORT" -U postgres "$@"; }

PGBIN=$(pgbin || true)

start() {
  tb_need_root
  if [ -z "$PGBIN" ] || [ ! -x "$PGBIN/postgres" ]; then
    # no default "main" cluster (it would also be started by the init script)
    mkdir -p /etc/postgresql-common/createcluster.d
    echo 'create_main_cluster = false' > /etc/postgresql-common/createcluster.d/scalebox-testbed.conf
    tb_apt_install postgresql
    PGBIN=$(pgbin)
    [ -x "$PGBIN/postgres" ] || tb_die "postgresql installed but no server binary under /usr/lib/postgresql"
  fi
  id "$OSUSER" >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin "$OSUSER"
  mkdir -p "$DIR"; chown "$OSUSER:" "$DIR"; chmod 700 "$DIR"
  if running && [ "$(sed -n 4p "$DIR/data/postmaster.pid")" != "$PORT" ]; then
    tb_log "postgres: running on another port, restarting on $PORT"
    as_pg "$PGBIN/pg_ctl" -D "$DIR/data" -m fast -w -t 60 stop >/dev/null
  fi
  if ! running; then
    if port_busy; then
      # somebody else's server on our port (e.g. another checkout's test-bed): use it if it
      # speaks PostgreSQL with trust auth for `postgres`, never stop it
      if PGCONNECT_TIMEOUT=5 psql_ -d postgres -tAqc 'SELECT 1' >/dev/null 2>&1; then
        tb_log "postgres: port $PORT is already served by a PostgreSQL not started from $DIR; reusing it (stop will not touch it)"
      else
        tb_die "port $PORT on 127.0.0.1 is in use by something that is not a usable PostgreSQL; set SCALEBOX_TESTBED_PG_PORT"
      fi
    else
      if [ ! -f "$DIR/data/PG_VERSION" ]; then
        rm -rf "$DIR/data"
        as_pg "$PGBIN/initdb" -D "$DIR/data" -U postgres -A trust -E UTF8 --locale=C.UTF-8 --no-sync \
          >"$DIR/initdb.log" 2>&1 || { cat "$DIR/initdb.log" >&2; tb_die "initdb failed"; }
      fi
      local opts="-k $DIR -p $PORT -c listen_addresses=127.0.0.1 -c max_connections=300"
      opts="$opts -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
      as_pg "$PGBIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w -t 60 -o "$opts" start >/dev/null \
        || { tail -20 "$DIR/server.log" >&2; tb_die "PostgreSQL did not start (log: $DIR/server.log)"; }
    fi
  fi
  local have
  have=$(psql_ -d postgres -tAqc "SELECT 1 FROM pg_database WHERE datname='$DB'")
  if [ "$have" != 1 ]; then
    # tolerate a concurrent creator
    psql_ -d postgres -qc "CREATE DATABASE \"$DB\"" 2>/dev/null \
      || [ "$(psql_ -d postgres -tAqc "SELECT 1 FROM pg_database WHERE datname='$DB'")" = 1 ] \
      || tb_die "cannot create database $DB"
  fi
  echo "DSN=$DSN"
}

stop() {
  if running; then
    as_pg "$PGBIN/pg_ctl" -D "$DIR/data" -m fast -w -t 60 stop >/dev/null 2>&1 || true
    echo "postgres stopped"
  else
    echo "postgres not running"
  fi
  if [ "${1:-}" = --wipe ]; then rm -rf "$DIR"; echo "postgres: removed $DIR"; fi
}

status() {
  if running; then
    echo "postgres running (pid $(head -1 "$DIR/data/postmaster.pid"), dir $DIR)"
    echo "DSN=$DSN"
  else
    echo "postgres not running (dir $DIR)"; return 3
  fi
}

case "${1:-}" in
  start) start ;;
  stop) shift; stop "$@" ;;
  status) status ;;
  *) echo "usage: $0 start|stop [--wipe]|status" >&2; exit 2 ;;
esac
