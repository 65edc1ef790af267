#!/usr/bin/env bash
# Podman for the test-bed on Debian 12 (bookworm), root, no systemd.
#
#   bash launchers/testbed/podman.sh install   # idempotent; prints PODMAN=/usr/bin/podman (version)
#   bash launchers/testbed/podman.sh status
#
# Installs Debian's podman 4.3 with runc (and catatonit for `run --init`), and writes
# /etc/containers/containers.conf for this kind of sandbox (cgroup v1 "hybrid" mounts, no
# CAP_SYS_RESOURCE): runtime runc (crun fails "cgroups in hybrid mode not supported"),
# cgroupfs manager, file events logger, explicit ulimits (the defaults fail
# "setrlimit RLIMIT_NOFILE: Operation not permitted"). An existing containers.conf that does
# not carry our marker is kept (and a warning printed), so a site's own settings win.
# Where /var/lib/containers sits on overlayfs (a container, e.g. a CI runner) the kernel
# refuses overlay-on-overlay: storage.conf then names the vfs driver explicitly. Left to
# auto-detect, podman's first run falls back to vfs but leaves an overlay/ directory behind,
# and every later run fails "prior storage driver overlay failed".
# No registry is used: the tests build their images from a local rootfs (containers/).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

CONF=/etc/containers/containers.conf
STORAGE_CONF=/etc/containers/storage.conf
MARK="# scalebox test-bed settings"

works() { command -v podman >/dev/null 2>&1 && podman info --format '{{.Host.OCIRuntime.Name}}' >/dev/null 2>&1; }

configure() {
  mkdir -p /etc/containers
  if [ -f "$CONF" ] && ! grep -q "^$MARK" "$CONF" && ! grep -q '^runtime = "runc"' "$CONF"; then
    tb_log "podman: keeping the existing $CONF (no scalebox marker); containers may fail in this sandbox"
    return 0
  fi
  cat >"$CONF" <<CONF
$MARK (launchers/testbed/podman.sh); Debian 12 podman 4.3 in a sandbox
# with hybrid cgroup v1 and without CAP_SYS_RESOURCE in the bounding set.
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
CONF
}

# the file system type under which podman keeps its images
storage_fs() {
  local dir=/var/lib/containers/storage
  while [ ! -e "$dir" ]; do dir=$(dirname "$dir"); done
  stat -f -c %T "$dir"
}

configure_storage() {
  if [ -f "$STORAGE_CONF" ] && ! grep -q "^$MARK" "$STORAGE_CONF"; then
    return 0  # the site's own
  fi
  if [ "$(storage_fs)" != overlayfs ] || command -v fuse-overlayfs >/dev/null 2>&1; then
    rm -f "$STORAGE_CONF"
    return 0
  fi
  cat >"$STORAGE_CONF" <<CONF
$MARK (launchers/testbed/podman.sh): /var/lib/containers is on overlayfs
[storage]
driver = "vfs"
runroot = "/run/containers/storage"
graphroot = "/var/lib/containers/storage"
CONF
  # what an auto-detecting first run may have left: an empty overlay store
  if [ -d /var/lib/containers/storage/overlay ] && [ -z "$(ls -A /var/lib/containers/storage/overlay-images 2>/dev/null)" ]; then
    rm -rf /var/lib/containers/storage/overlay /var/lib/containers/storage/overlay-images \
      /var/lib/containers/storage/overlay-layers /var/lib/containers/storage/overlay-containers
  fi
}

install() {
  tb_need_root
  if ! command -v podman >/dev/null 2>&1 || ! command -v runc >/dev/null 2>&1 \
      || ! dpkg -s catatonit >/dev/null 2>&1; then
    tb_apt_install podman runc catatonit
  fi
  configure
  configure_storage
  works || tb_die "podman installed but \`podman info\` fails (see $CONF)"
  echo "PODMAN=$(command -v podman) ($(podman --version))"
}

status() {
  if works; then echo "PODMAN=$(command -v podman) ($(podman --version))"; else echo "podman not usable"; return 3; fi
}

case "${1:-}" in
  install) install ;;
  status) status ;;
  *) echo "usage: $0 install|status" >&2; exit 2 ;;
esac
