#!/usr/bin/env bash
# gather/setup: runs once per slot before its first task; start the sums at zero.
set -euo pipefail

dir=${WORK_DIR:-$PWD}
echo 0 >"$dir/sum"
echo 0 >"$dir/count"
