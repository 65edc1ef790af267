#!/usr/bin/env bash
# Emulated hosts for the test-bed: N network namespaces on a private bridge, so launchers,
# daemons and clients of one machine talk over a real (virtual) network, each "host" with its
# own address and its own loopback.
#
#   bash launchers/testbed/netns.sh up [N=3]   # idempotent; prints NETNS_HOSTS=sbx-h1=10.77.0.11,...
#   bash launchers/testbed/netns.sh status     # exit 0 when the bridge is up
#   bash launchers/testbed/netns.sh down       # refuses while a namespace still has processes
#
# Layout (fixed; lib.sh TB_NETNS_*):
#   bridge sbxbr0, 10.77.0.1/24, in the root namespace: the "head node". The test-bed
#     PostgreSQL listens there too when the bridge exists at its start (postgres.sh).
#   host I: namespace sbx-hI with a veth `eth0` 10.77.0.(10+I)/24 (peer veth-hI on the bridge)
#     and its own `lo`; no default route and no NAT, so only 10.77.0.0/24 and the namespace's
#     own 127.0.0.1 are reachable from inside. Nothing outside 10.77.0.0/24 and 127/8 is targeted.
# Run a process on host I:
#   nsenter --net=/run/netns/sbx-hI CMD...             (keeps /sys/fs/cgroup visible)
#   ... unshare --uts sh -c 'hostname hI; exec "$@"' sh CMD...   (its own hostname too)
# (`ip netns exec` works for ordinary programs but remounts /sys, which hides the cgroups.)
# Same layout as ../shared/env/netns-hosts.sh, so either script can set up or reuse the hosts.
# Stop is never by name: `down` deletes a namespace only when no process is left in it.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

BR=$TB_NETNS_BRIDGE
NET=$TB_NETNS_PREFIX

hosts() {  # the sbx-hI namespaces that exist, in order
  local f
  for f in /run/netns/sbx-h*; do
    [ -e "$f" ] || continue
    [[ ${f##*/} =~ ^sbx-h[0-9]+$ ]] && echo "${f##*/}"
  done | sort -V
}

has_addr() {  # has_addr NS DEV ADDR/LEN   (NS "" = root namespace)
  local out
  if [ -n "$1" ]; then out=$(ip -n "$1" -4 -o addr show dev "$2" 2>/dev/null) || return 1
  else out=$(ip -4 -o addr show dev "$2" 2>/dev/null) || return 1; fi
  [[ $out == *" $3 "* ]]
}

up() {
  local n=${1:-3} i ns addr list=()
  if ! [[ $n =~ ^[0-9]+$ ]] || [ "$n" -lt 1 ] || [ "$n" -gt 99 ]; then tb_die "netns: N must be 1..99, got '$n'"; fi
  tb_need_root
  command -v ip >/dev/null 2>&1 || tb_apt_install iproute2
  command -v nsenter >/dev/null 2>&1 || tb_apt_install util-linux
  ip link show dev "$BR" >/dev/null 2>&1 || ip link add "$BR" type bridge \
    || tb_die "netns: cannot create bridge $BR (needs CAP_NET_ADMIN in the root network namespace)"
  has_addr "" "$BR" "$TB_NETNS_HEAD/24" || ip addr add "$TB_NETNS_HEAD/24" dev "$BR"
  ip link set "$BR" up
  for i in $(seq 1 "$n"); do
    ns=sbx-h$i addr=$NET.$((10 + i))
    [ -e "/run/netns/$ns" ] || ip netns add "$ns" || tb_die "netns: cannot create namespace $ns"
    # a veth pair lives and dies as one: veth-hI missing means eth0 in the namespace is gone too
    ip link show dev "veth-h$i" >/dev/null 2>&1 || ip link add "veth-h$i" type veth peer name eth0 netns "$ns"
    ip link set "veth-h$i" master "$BR" up
    has_addr "$ns" eth0 "$addr/24" || ip -n "$ns" addr add "$addr/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    list+=("$ns=$addr")
  done
  # host-to-host traffic crosses the bridge; with br_netfilter loaded it also meets iptables FORWARD
  if [ "$(cat /proc/sys/net/bridge/bridge-nf-call-iptables 2>/dev/null || echo 0)" = 1 ] \
     && command -v iptables >/dev/null 2>&1; then
    local policy
    policy=$(iptables -S FORWARD 2>/dev/null | head -1 || true)
    [ "$policy" != "-P FORWARD DROP" ] \
      || tb_log "netns: iptables FORWARD policy is DROP and bridged traffic is filtered: host-to-host connections on $BR may fail"
  fi
  echo "NETNS_HOSTS=$(IFS=,; echo "${list[*]}")"
}

down() {
  tb_need_root
  command -v ip >/dev/null 2>&1 || { echo "netns: no ip command, nothing to remove"; return 0; }
  local ns pids rc=0
  for ns in $(hosts); do
    pids=$(ip netns pids "$ns" | tr '\n' ' ')
    if [ -n "${pids// /}" ]; then
      tb_log "netns: $ns still has processes ($pids); end them by PID first"; rc=1; continue
    fi
    ip netns del "$ns"
  done
  if [ "$rc" = 0 ] && ip link show dev "$BR" >/dev/null 2>&1; then ip link del "$BR"; fi
  [ "$rc" = 0 ] && echo "netns hosts removed"
  return "$rc"
}

status() {
  command -v ip >/dev/null 2>&1 || { echo "netns: iproute2 not installed"; return 3; }
  local ns addr rc=0
  if tb_netns_head_up; then echo "bridge $BR: $TB_NETNS_HEAD/24"; else echo "bridge $BR: absent or without $TB_NETNS_HEAD"; rc=3; fi
  for ns in $(hosts); do
    addr=$(ip -n "$ns" -4 -o addr show dev eth0 2>/dev/null | awk '{print $4}' || true)
    echo "$ns: ${addr:-no address} pids: $(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')"
  done
  return "$rc"
}

case "${1:-}" in
  up) up "${2:-3}" ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up [N] | down | status" >&2; exit 2 ;;
esac
