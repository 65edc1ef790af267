#!/usr/bin/env bash
# hello: print the task body, then finish the app with a greeting.
#   run.sh BODY HEADERS_JSON
set -euo pipefail

echo "Input message:$1"
scalebox app set-finished "Hello $1, it is OK!"
