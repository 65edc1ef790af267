#!/usr/bin/env bash
# The "main job" of the README: run an example pipeline end to end on this machine, with a
# private embedded PostgreSQL started automatically (no Slurm, no containers, no set-up).
#
#   bash launchers/run-example.sh                 # app-primes -> prints "Result is 1229"
#   bash launchers/run-example.sh hello-scalebox  # -> "Hello scalebox, it is OK!"
#   NUM_GROUPS=20 bash launchers/run-example.sh   # env overrides the example's scalebox.env
#
# Creates the project venv (.venv) on first use: Debian's python refuses a bare pip install.
# Stop the embedded database afterwards with: .venv/bin/scalebox db stop
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PROJECT=$(cd "$HERE/.." && pwd)
EXAMPLE=${1:-app-primes}
[ -f "$PROJECT/examples/$EXAMPLE/app.yaml" ] || { echo "no example '$EXAMPLE' in $PROJECT/examples" >&2; exit 2; }
VENV=$(PROJECT=$PROJECT bash "$HERE/testbed/venv.sh" | tail -1)
shift || true
exec "$VENV/bin/scalebox" run "$PROJECT/examples/$EXAMPLE/app.yaml" "$@"
