#!/usr/bin/env bash
# Chromium for the test-bed: the report test renders `scalebox report`'s HTML in headless
# Chromium to a PNG (tests/acceptance/test_cli_report.py). Debian's package (bookworm-security);
# about 20 s and 120 MB to download the first time.
#
#   bash launchers/testbed/chromium.sh install   # idempotent; prints CHROMIUM_BIN=/usr/bin/chromium
#   bash launchers/testbed/chromium.sh status
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

case "${1:-install}" in
  install)
    tb_need_root
    command -v chromium >/dev/null 2>&1 || tb_apt_install chromium
    command -v chromium >/dev/null 2>&1 || tb_die "chromium is not on PATH after the install"
    echo "CHROMIUM_BIN=$(command -v chromium)"
    ;;
  status)
    if command -v chromium >/dev/null 2>&1; then echo "CHROMIUM_BIN=$(command -v chromium)"; chromium --version; else echo "chromium: not installed"; exit 1; fi
    ;;
  *) tb_die "usage: $(basename "$0") install|status" ;;
esac
