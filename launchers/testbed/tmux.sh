#!/usr/bin/env bash
# tmux for the test-bed: the terminal tests drive `scalebox run` through a real pane
# (tests/acceptance/test_run_terminal.py).
#
#   bash launchers/testbed/tmux.sh install   # idempotent; prints TMUX_BIN=/usr/bin/tmux
#   bash launchers/testbed/tmux.sh status
set -euo pipefail
# shellcheck source-path=SCRIPTDIR
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

case "${1:-install}" in
  install)
    tb_need_root
    command -v tmux >/dev/null 2>&1 || tb_apt_install tmux
    command -v tmux >/dev/null 2>&1 || tb_die "tmux is not on PATH after the install"
    echo "TMUX_BIN=$(command -v tmux)"
    ;;
  status)
    if command -v tmux >/dev/null 2>&1; then echo "TMUX_BIN=$(command -v tmux)"; tmux -V; else echo "tmux: not installed"; exit 1; fi
    ;;
  *) tb_die "usage: $(basename "$0") install|status" ;;
esac
