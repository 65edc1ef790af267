#!/usr/bin/env bash
set -euo pipefail
if [ "$1" = 0 ]; then
    send-message 1
    send-message 2
    send-message 3
fi
exit "$1"
