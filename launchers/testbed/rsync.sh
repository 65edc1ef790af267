#!/usr/bin/env bash
# rsync for the test-bed (the list-dir / file-copy standard modules and their tests).
#
#   bash launchers/testbed/rsync.sh install   # idempotent; prints RSYNC=/usr/bin/rsync
#   bash launchers/testbed/rsync.sh status
#
# Installs the Debian package (no daemon is started: the tests run their own
# `rsync --daemon --no-detach` on 127.0.0.1 with a temporary config).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

case "${1:-install}" in
  install)
    tb_need_root
    if ! command -v rsync >/dev/null 2>&1; then
      tb_apt_install rsync
    fi
    command -v rsync >/dev/null 2>&1 || tb_die "rsync is not on PATH after the install"
    echo "RSYNC=$(command -v rsync)"
    ;;
  status)
    if command -v rsync >/dev/null 2>&1; then
      echo "RSYNC=$(command -v rsync)"; rsync --version | head -1
    else
      echo "rsync: not installed"; exit 1
    fi
    ;;
  *) tb_die "usage: $(basename "$0") install|status" ;;
esac
