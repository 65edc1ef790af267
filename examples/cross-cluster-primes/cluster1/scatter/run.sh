#!/usr/bin/env bash
# scatter: emit the first number of each group, zero-padded to 10 digits:
# 0000000001, 0000001001, ... (NUM_GROUPS messages, LENGTH apart) to calc.
#   run.sh BODY HEADERS_JSON      (the body, e.g. "start", is not used)
set -euo pipefail

groups=$((10#${NUM_GROUPS:?NUM_GROUPS is not set}))
length=$((10#${LENGTH:?LENGTH is not set}))
for ((i = 0; i < groups; i++)); do
    send-message "$(printf %010d $((1 + i * length)))"
done
echo "scatter: $groups groups of $length numbers"
