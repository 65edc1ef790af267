#!/usr/bin/env bash
# gather: add the count of "start,count" to the running sum kept in WORK_DIR;
# the NUM_GROUPS-th message finishes the app with "Result is <sum>".
#   run.sh START,COUNT HEADERS_JSON
set -euo pipefail

dir=${WORK_DIR:-$PWD}
body=$1
n=${body##*,}
if [[ $body != *,* || ! $n =~ ^[0-9]+$ ]]; then
    echo "gather: bad input '$body' (expected START,COUNT)" >&2
    exit 2
fi
if [[ ! -f $dir/sum || ! -f $dir/count ]]; then
    echo "gather: no sum/count in $dir (setup.sh has not run)" >&2
    exit 3
fi
sum=$(($(<"$dir/sum") + 10#$n))
count=$(($(<"$dir/count") + 1))
echo "$sum" >"$dir/sum.tmp" && mv -f "$dir/sum.tmp" "$dir/sum"
echo "$count" >"$dir/count.tmp" && mv -f "$dir/count.tmp" "$dir/count"
echo "gather: group ${body%%,*} has $n primes; $sum after $count of ${NUM_GROUPS:?NUM_GROUPS is not set} groups"
if ((count == 10#$NUM_GROUPS)); then
    scalebox app set-finished "Result is $sum"
fi
