#!/usr/bin/env bash
# calc: count the primes in [start, start+LENGTH-1] and send "start,count" to gather.
#   run.sh START HEADERS_JSON      (START is zero-padded, e.g. 0000001001)
set -euo pipefail

body=$1
if [[ ! $body =~ ^[0-9]+$ ]]; then
    echo "calc: bad input '$body' (expected a number)" >&2
    exit 2
fi
start=$((10#$body))   # 10#: a leading zero would otherwise mean octal
end=$((start + 10#${LENGTH:?LENGTH is not set} - 1))
# factor prints "n: p1 p2 ..."; a prime has exactly one factor (1 prints "1:").
count=$(seq "$start" "$end" | factor | awk 'NF == 2 { n++ } END { print n + 0 }')
echo "calc: $count primes in [$start, $end]"
send-message "$body,$count"
