#!/usr/bin/env bash
# A second PostgreSQL for the security tests (tests/security/): TLS only on TCP, scram-sha-256
# passwords, two database users for two OS users (Debian 12, root, no systemd).
#
#   bash launchers/testbed/postgres-tls.sh start    # idempotent; prints the export line below
#   bash launchers/testbed/postgres-tls.sh status   # exit 0 when running (and prints it)
#   bash launchers/testbed/postgres-tls.sh stop [--wipe]
#
# start prints
#   export SCALEBOX_TEST_PGTLS_DIR=/tmp/scalebox-testbed-pgtls
# under which the tests find:
#   run/                the unix socket (trust: the admin's `db init` / `db grant`, test use only)
#   certs/ca.crt        the site CA (self-signed); server.crt has SAN DNS:localhost, IP:127.0.0.1
#   users/root/         pgpass (0600, root): sbx_alice's and sbx_alice_launcher's passwords; root.crt
#   users/sbxtest/      pgpass (0600, sbxtest, dir 0700): sbx_bob's and sbx_bob_launcher's; root.crt
# sbx_alice_launcher / sbx_bob_launcher are the login roles of their launchers (migration 0018):
# a test database binds them with `scalebox db grant sbx_alice --launcher` (the role exists, so
# only the membership of sbx_launcher and the binding are made there).
# and makes the directories above the checkout passable for sbxtest (o+x), who runs its CLI.
# TCP logins: `hostssl ... scram-sha-256` only (no TLS: refused); clients use
#   postgresql://sbx_alice@127.0.0.1:55435/scalebox?sslmode=verify-full&sslrootcert=.../root.crt
# with PGPASSFILE pointing at their pgpass. Recipe and pitfalls: ../shared/env/README.md §9
# (a server key readable by the postgres user only via root:postgres 0640; libpq ignores a pgpass
# with group/other bits; the pgpass host field must equal host=).
#
# Env (optional): SCALEBOX_TESTBED_PGTLS_DIR, SCALEBOX_TESTBED_PGTLS_PORT=55435.
# Stop is by PID file only (pg_ctl stop signals the PID in data/postmaster.pid).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

DIR=${SCALEBOX_TESTBED_PGTLS_DIR:-/tmp/scalebox-testbed-pgtls}
PORT=${SCALEBOX_TESTBED_PGTLS_PORT:-55435}
DB=scalebox
OSUSER=postgres
# test data only: these passwords are not secrets (the tests grep for them where they must not be)
ALICE_PW=${SCALEBOX_TESTBED_PGTLS_ALICE_PW:-alice-S3cret-tls}
BOB_PW=${SCALEBOX_TESTBED_PGTLS_BOB_PW:-bob-S3cret-tls}
ALICE_LAUNCHER_PW=${SCALEBOX_TESTBED_PGTLS_ALICE_LAUNCHER_PW:-alice-launcher-S3cret-tls}
BOB_LAUNCHER_PW=${SCALEBOX_TESTBED_PGTLS_BOB_LAUNCHER_PW:-bob-launcher-S3cret-tls}

# shellcheck disable=SC2012  # version-sorted directory names, no odd characters
pgbin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }
as_pg() { (cd / && runuser -u "$OSUSER" -- "$@"); }
PGBIN=$(pgbin || true)
running() { [ -n "$PGBIN" ] && [ -f "$DIR/data/postmaster.pid" ] && as_pg "$PGBIN/pg_ctl" -D "$DIR/data" status >/dev/null 2>&1; }
psql_admin() { "$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$DIR/run" -p "$PORT" -U postgres "$@"; }
print_env() { echo "export SCALEBOX_TEST_PGTLS_DIR=$DIR"; }

certificates() {
  local c=$DIR/certs
  mkdir -p "$c"; chmod 755 "$DIR" "$c"
  if [ ! -s "$c/server.crt" ] || [ ! -s "$c/ca.crt" ]; then
    ( umask 077
      openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
        -keyout "$c/ca.key" -out "$c/ca.crt" -days 3650 -subj "/CN=scalebox-test-ca" 2>/dev/null
      openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 \
        -keyout "$c/server.key" -out "$c/server.csr" -subj "/CN=localhost" 2>/dev/null
      printf '%s\n' "subjectAltName=DNS:localhost,IP:127.0.0.1" "basicConstraints=critical,CA:FALSE" \
        "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" >"$c/server.ext"
      openssl x509 -req -in "$c/server.csr" -CA "$c/ca.crt" -CAkey "$c/ca.key" -CAcreateserial \
        -out "$c/server.crt" -days 825 -extfile "$c/server.ext" 2>/dev/null )
    chmod 644 "$c/ca.crt" "$c/server.crt"
  fi
  chown root:"$OSUSER" "$c/server.key"; chmod 640 "$c/server.key"
}

server() {
  mkdir -p "$DIR/data" "$DIR/run"
  chown "$OSUSER": "$DIR/data" "$DIR/run"; chmod 700 "$DIR/data"; chmod 755 "$DIR/run"
  if [ ! -f "$DIR/data/PG_VERSION" ]; then
    as_pg "$PGBIN/initdb" -D "$DIR/data" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
      -E UTF8 --locale=C.UTF-8 --no-sync >"$DIR/initdb.log" 2>&1 || { cat "$DIR/initdb.log" >&2; exit 1; }
    printf '%s\n' "# launchers/testbed/postgres-tls.sh: TCP only over TLS, with a SCRAM password" \
      "local    all  all                  trust" \
      "hostssl  all  all  127.0.0.1/32    scram-sha-256" \
      "hostssl  all  all  ::1/128         scram-sha-256" >"$DIR/data/pg_hba.conf"
    printf '%s\n' "ssl = on" "ssl_cert_file = '$DIR/certs/server.crt'" "ssl_key_file = '$DIR/certs/server.key'" \
      "ssl_min_protocol_version = 'TLSv1.2'" "password_encryption = 'scram-sha-256'" >>"$DIR/data/postgresql.conf"
  fi
  if ! running; then
    as_pg "$PGBIN/pg_ctl" -D "$DIR/data" -l "$DIR/run/server.log" -w -t 60 -o "-k $DIR/run -p $PORT \
      -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
      start >/dev/null || { tail -20 "$DIR/run/server.log" >&2; exit 1; }
  fi
  psql_admin -d postgres <<EOF
SELECT format('CREATE DATABASE %I', '$DB') WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = '$DB')\\gexec
SELECT format('CREATE ROLE %I LOGIN', r)
FROM unnest(ARRAY['sbx_alice', 'sbx_bob', 'sbx_alice_launcher', 'sbx_bob_launcher']) AS r
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r)\\gexec
ALTER ROLE sbx_alice PASSWORD '$ALICE_PW';
ALTER ROLE sbx_bob PASSWORD '$BOB_PW';
ALTER ROLE sbx_alice_launcher PASSWORD '$ALICE_LAUNCHER_PW';
ALTER ROLE sbx_bob_launcher PASSWORD '$BOB_LAUNCHER_PW';
EOF
}

# client_files OSUSER DBROLE PASSWORD [DBROLE PASSWORD ...]: the OS user's pgpass (0600, theirs),
# a line per role and host name, and the CA in users/OSUSER/
client_files() {
  local home=$DIR/users/$1 osuser=$1
  shift
  mkdir -p "$home"; chmod 755 "$DIR/users"
  cp "$DIR/certs/ca.crt" "$home/root.crt"; chmod 644 "$home/root.crt"
  ( umask 077; : >"$home/pgpass" )
  while [ "$#" -ge 2 ]; do
    printf '%s\n' "127.0.0.1:$PORT:*:$1:$2" "localhost:$PORT:*:$1:$2" >>"$home/pgpass"
    shift 2
  done
  chown -R "$osuser": "$home"; chmod 600 "$home/pgpass"; chmod 700 "$home"
}

# tests/security runs the checkout's CLI as sbxtest: every directory above the project must let
# others pass (a clone under /root, 0700 on Debian, does not); the files themselves are 0644/0755
reach_for_sbxtest() {
  local d=$PROJECT
  while [ "$d" != / ]; do
    if ! runuser -u sbxtest -- test -x "$d"; then
      chmod o+x "$d"
      tb_log "chmod o+x $d: sbxtest runs this checkout's scalebox in tests/security"
    fi
    d=$(dirname "$d")
  done
}

login_check() {  # the TLS + SCRAM login works for alice (as root) with verify-full
  local dsn="postgresql://sbx_alice@127.0.0.1:$PORT/$DB?sslmode=verify-full&sslrootcert=$DIR/users/root/root.crt"
  local out
  out=$(PGPASSFILE=$DIR/users/root/pgpass "$PGBIN/psql" -X -w "$dsn" -tAc \
    "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()" 2>&1) || true
  [ "$out" = t ] || tb_die "verify-full login to the TLS server failed: $out"
}

case "${1:-}" in
  start)
    tb_need_root
    t0=$(tb_now)
    if [ -z "$PGBIN" ] || [ ! -x "$PGBIN/postgres" ]; then
      tb_apt_install postgresql openssl
      PGBIN=$(pgbin)
    fi
    command -v openssl >/dev/null || tb_apt_install openssl
    id "$OSUSER" >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin "$OSUSER"
    id -u sbxtest >/dev/null 2>&1 || useradd -M -s /bin/bash sbxtest || tb_die "cannot create user sbxtest"
    certificates
    server
    client_files root sbx_alice "$ALICE_PW" sbx_alice_launcher "$ALICE_LAUNCHER_PW"
    client_files sbxtest sbx_bob "$BOB_PW" sbx_bob_launcher "$BOB_LAUNCHER_PW"
    reach_for_sbxtest
    login_check
    tb_log "postgres-tls on 127.0.0.1:$PORT (TLS + scram, alice/bob and their launcher roles) in $(tb_since "$t0") s"
    print_env ;;
  status)
    running && print_env ;;
  stop)
    if running; then as_pg "$PGBIN/pg_ctl" -D "$DIR/data" -m fast -w -t 60 stop >/dev/null; fi
    [ "${2:-}" = --wipe ] && rm -rf "$DIR"
    exit 0 ;;
  *)
    echo "usage: $0 start|status|stop [--wipe]" >&2; exit 2 ;;
esac
