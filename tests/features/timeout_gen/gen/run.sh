#!/usr/bin/env bash
set -euo pipefail
for _ in $(seq 1 30); do
    date '+%H:%M:%S.%N'
    sleep 1
done
