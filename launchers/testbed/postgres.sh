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
# Emulated hosts (netns.sh): when the bridge sbxbr0 carries 10.77.0.1 at start, the server also
# listens on 10.77.0.1 and pg_hba trusts 10.77.0.0/24, so launchers in the namespaces connect to
# postgresql://postgres@10.77.0.1:PORT/DB. Without the bridge it listens on 127.0.0.1 only (the
# pg_hba line is always there and harmless). A server of ours already running without
# 10.77.0.1 while the bridge exists is restarted once, after waiting up to
# SCALEBOX_TESTBED_PG_RESTART_WAIT seconds (default 60) for other clients to disconnect
# (the test-bed server is shared by every checkout on this machine).
#
# Env (optional):
#   SCALEBOX_TESTBED_PG_DIR=/tmp/scalebox-testbed-pg   cluster dir (data/, socket, log)
#   SCALEBOX_TESTBED_PG_PORT=55432                     TCP port on 127.0.0.1 (and 10.77.0.1)
#   SCALEBOX_TESTBED_PG_DB=scalebox                    database created on start
# Stop is by PID file only (pg_ctl stop signals the PID in data/postmaster.pid).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DIR=${SCALEBOX_TESTBED_PG_DIR:-/tmp/scalebox-testbed-pg}
PORT=${SCALEBOX_TESTBED_PG_PORT:-55432}
DB=${SCALEBOX_TESTBED_PG_DB:-scalebox}
OSUSER=postgres
DSN="postgresql://postgres@127.0.0.1:$PORT/$DB"
RESTART_WAIT=${SCALEBOX_TESTBED_PG_RESTART_WAIT:-60}
HBA_MARK="# scalebox test-bed: emulated hosts (launchers/testbed/netns.sh)"

pgbin() { local d; for d in /usr/lib/postgresql/*/bin; do [ -d "$d" ] && printf '%s\n' "$d"; done | sort -V | tail -1; }
as_pg() { (cd / && runuser -u "$OSUSER" -- "$@"); }
running() { [ -n "$PGBIN" ] && [ -f "$DIR/data/postmaster.pid" ] && as_pg "$PGBIN/pg_ctl" -D "$DIR/data" status >/dev/null 2>&1; }
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; }
netns_served() { (exec 3<>"/dev/tcp/$TB_NETNS_HEAD/$PORT") 2>/dev/null; }
psql_() { "$PGBIN/psql" -X -h 127.0.0.1 -p "$PORT" -U postgres "$@"; }

PGBIN=$(pgbin || true)

listen_addresses() {
  if tb_netns_head_up; then echo "127.0.0.1,$TB_NETNS_HEAD"; else echo 127.0.0.1; fi
}

# pg_hba: trust the emulated hosts too (idempotent; a running server reloads)
allow_netns_hosts() {
  local hba=$DIR/data/pg_hba.conf
  [ -f "$hba" ] || return 0
  if ! grep -qF "$HBA_MARK" "$hba"; then
    printf '%s\nhost    all             all             %s            trust\n' "$HBA_MARK" "$TB_NETNS_CIDR" >>"$hba"
    running && as_pg "$PGBIN/pg_ctl" -D "$DIR/data" reload >/dev/null
  fi
  return 0
}

# other sessions' connections (the server is shared): wait up to RESTART_WAIT s for none
wait_for_quiet() {
  local end n
  end=$(( $(date +%s) + RESTART_WAIT ))
  while :; do
    n=$(psql_ -d postgres -tAqc "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()" 2>/dev/null || echo 0)
    [ "$n" = 0 ] && return 0
    if [ "$(date +%s)" -ge "$end" ]; then
      tb_log "postgres: $n client connection(s) still open after ${RESTART_WAIT} s; restarting anyway"
      return 0
    fi
    sleep 0.5
  done
}

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
  allow_netns_hosts
  if running && tb_netns_head_up && ! netns_served; then
    tb_log "postgres: the emulated hosts' bridge is up but the server does not listen on $TB_NETNS_HEAD; restarting it (once)"
    wait_for_quiet
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
        allow_netns_hosts
      fi
      local opts listen
      listen=$(listen_addresses)
      opts="-k $DIR -p $PORT -c listen_addresses=$listen -c max_connections=300"
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
  if tb_netns_head_up && ! netns_served; then
    tb_log "postgres: the emulated hosts cannot reach $TB_NETNS_HEAD:$PORT (a server not started from $DIR?)"
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
    echo "postgres running (pid $(head -1 "$DIR/data/postmaster.pid"), dir $DIR, listen_addresses $(psql_ -d postgres -tAqc 'SHOW listen_addresses' 2>/dev/null || echo '?'))"
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
