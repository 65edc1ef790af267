#!/usr/bin/env bash
# gather: record the count of "start,count" as WORK_DIR/parts/<start>; the sum of all parts is
# the result, set once NUM_GROUPS groups are in. One file per group makes a re-run idempotent:
# a task re-run after a crash rewrites the same file instead of adding its count twice.
#   run.sh START,COUNT HEADERS_JSON
set -euo pipefail

parts=${WORK_DIR:-$PWD}/parts
body=$1
start=${body%%,*}
n=${body##*,}
if [[ $body != *,* || ! $n =~ ^[0-9]+$ || ! $start =~ ^[0-9]+$ ]]; then
    echo "gather: bad input '$body' (expected START,COUNT)" >&2
    exit 2
fi
if [[ ! -d $parts ]]; then
    echo "gather: no $parts (setup.sh has not run)" >&2
    exit 3
fi
echo "$((10#$n))" >"$parts/$start.tmp" && mv -f "$parts/$start.tmp" "$parts/$start"
shopt -s nullglob
files=("$parts"/[0-9]*)
count=${#files[@]}
sum=$(cat "${files[@]}" | awk '{ s += $1 } END { print s + 0 }')
echo "gather: group $start has $n primes; $sum after $count of ${NUM_GROUPS:?NUM_GROUPS is not set} groups"
if ((count == 10#$NUM_GROUPS)); then
    scalebox app set-finished "Result is $sum"
fi
