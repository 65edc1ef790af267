# shellcheck shell=bash
# Shared helpers for the test-bed scripts (sourced, not executed).
# Debian 12, root, no systemd. Everything is non-interactive and works without a TTY.

TESTBED_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PROJECT=${PROJECT:-$(cd "$TESTBED_DIR/../.." && pwd)}
export DEBIAN_FRONTEND=noninteractive

tb_log() { echo "[testbed] $*" >&2; }
tb_die() { echo "[testbed] ERROR: $*" >&2; exit 1; }

tb_need_root() {
  [ "$(id -u)" = 0 ] || tb_die "$(basename "$0") must run as root (it installs packages and starts daemons)"
}

# apt-get with a lock timeout, so concurrent apt runs wait instead of failing
tb_apt() {
  apt-get -q -o DPkg::Lock::Timeout=300 -o Acquire::Retries=3 "$@" </dev/null
}

# `apt-get update` at most once per 6 h (stamp), or always with force
tb_apt_update() {
  local stamp=/var/lib/apt/periodic/scalebox-testbed-update-stamp
  if [ "${1:-}" = force ] || [ ! -f "$stamp" ] || [ -n "$(find "$stamp" -mmin +360 2>/dev/null)" ]; then
    tb_log "apt-get update"
    tb_apt update -qq >/dev/null || { tb_log "apt-get update failed"; return 1; }
    mkdir -p "$(dirname "$stamp")" && touch "$stamp"
  fi
}

# tb_apt_install PKG... : update the package lists first, then install without
# recommends. Daemons are never started by package scripts: a temporary
# policy-rc.d (exit 101) is put in place unless the machine already has one.
tb_apt_install() {
  local tmp_policy=0 rc=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\n# temporary, from scalebox launchers/testbed\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    tmp_policy=1
  fi
  tb_log "apt-get install $*"
  tb_apt_update || true
  if ! tb_apt install -y -qq --no-install-recommends "$@" >/tmp/scalebox-testbed-apt.log 2>&1; then
    # stale lists (404 on a superseded version): refresh once and retry
    tb_apt_update force || true
    tb_apt install -y -qq --no-install-recommends "$@" >/tmp/scalebox-testbed-apt.log 2>&1 || rc=$?
  fi
  [ "$tmp_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
  if [ "$rc" != 0 ]; then
    tail -30 /tmp/scalebox-testbed-apt.log >&2
    tb_die "apt-get install $* failed (full log: /tmp/scalebox-testbed-apt.log)"
  fi
}

# true when the PID in file $1 is alive
tb_alive() { [ -f "$1" ] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null; }

tb_now() { date +%s.%N; }
tb_since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN{printf "%.1f", b-a}'; }

# Emulated hosts (netns.sh): bridge sbxbr0 = the "head node" 10.77.0.1/24 in the root namespace,
# host I = network namespace sbx-hI at 10.77.0.(10+I). Nothing outside 10.77.0.0/24 is targeted.
TB_NETNS_BRIDGE=sbxbr0
# shellcheck disable=SC2034  # used by netns.sh, which sources this file
TB_NETNS_PREFIX=10.77.0
TB_NETNS_HEAD=10.77.0.1
# shellcheck disable=SC2034  # used by postgres.sh, which sources this file
TB_NETNS_CIDR=10.77.0.0/24

# true when the bridge carries the head address (the emulated hosts can reach this machine)
tb_netns_head_up() {
  local addrs
  addrs=$(ip -4 -o addr show dev "$TB_NETNS_BRIDGE" 2>/dev/null) || return 1
  [[ $addrs == *" $TB_NETNS_HEAD/24 "* ]]
}
