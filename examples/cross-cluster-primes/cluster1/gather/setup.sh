#!/usr/bin/env bash
# gather's slot set-up: the state lives in WORK_DIR/parts, one file per group, kept across
# the slot's tasks and across a restart of the slot on the same host.
set -euo pipefail

mkdir -p "${WORK_DIR:-$PWD}/parts"
