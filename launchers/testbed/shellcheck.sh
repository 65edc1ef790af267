#!/usr/bin/env bash
# Runs shellcheck over every shell script tracked in git: the test-bed's lint phase (run-tests.sh), next to
# ruff, mypy and lint-imports. tests/unit/test_shell_lint.py lists the scripts its own way and fails
# when one is not linted here, so a new script cannot dodge the lint.
#
#   bash launchers/testbed/shellcheck.sh          lint them all (shellcheck -x -P SCRIPTDIR)
#   bash launchers/testbed/shellcheck.sh --install  the same, installing shellcheck first if missing (root, apt)
#   bash launchers/testbed/shellcheck.sh --list   print the files it lints, one a line
#
# A shell script: a tracked file named *.sh or *.bash, or whose #! line runs sh, bash, dash or ksh.
# Not linted: launchers/slurm/stage.sbatch, a template whose {placeholders} are not shell; its
# rendering, tests/unit/slurm_fixtures/stage.sbatch.golden (held equal to it by tests/unit/test_stages.py),
# is linted instead.
# Excluded check: SC2317 (info, "command appears to be unreachable"), which shellcheck 0.9 reports
# for every function that is only called from a trap (run-tests.sh's summary, the stage job's forward).
# Env: SHELLCHECK=path of shellcheck (default: the one on PATH).
# Exit code: shellcheck's (0 clean, 1 findings of any severity); 2 when this is not a git
# checkout or there is no shellcheck to run.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$HERE/../.."

TEMPLATES=(launchers/slurm/stage.sbatch)
SHEBANG='^#!.*[/ ](ba|da|k)?sh([[:space:]]|$)'

list_scripts() {
  local f first
  git ls-files -z | while IFS= read -r -d '' f; do
    [ -f "$f" ] || continue
    case " ${TEMPLATES[*]} " in *" $f "*) continue ;; esac
    case "$f" in *.sh | *.bash) printf '%s\n' "$f"; continue ;; esac
    IFS= read -r first <"$f" || true
    if [[ $first =~ $SHEBANG ]]; then printf '%s\n' "$f"; fi
  done
}

git rev-parse --is-inside-work-tree >/dev/null 2>&1 || { echo "shellcheck.sh: not a git checkout" >&2; exit 2; }
if [ "${1:-}" = --list ]; then
  list_scripts
  exit 0
fi
SHELLCHECK=${SHELLCHECK:-shellcheck}
if [ "${1:-}" = --install ] && ! command -v "$SHELLCHECK" >/dev/null; then
  # shellcheck source-path=SCRIPTDIR
  . "$HERE/lib.sh"
  tb_need_root
  tb_apt_install shellcheck
fi
command -v "$SHELLCHECK" >/dev/null || { echo "shellcheck.sh: $SHELLCHECK not found" >&2; exit 2; }
mapfile -t scripts < <(list_scripts)
echo "shellcheck: ${#scripts[@]} scripts" >&2
exec "$SHELLCHECK" -x -P SCRIPTDIR --exclude=SC2317 -- "${scripts[@]}"
