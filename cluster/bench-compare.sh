#!/usr/bin/env bash
# Two builds of `colony` side by side in one run, on this machine: cluster/bench.sh (submissions,
# with etcd as the reference) and cluster/bench-schedule.sh (placement), each run for the first
# binary, then the second, then the first again, so drift shows as a difference between the runs
# of the same binary. Usage: cluster/bench-compare.sh BEFORE_BIN AFTER_BIN [DURATION] [EXECUTORS] [TASKS]
set -euo pipefail
cd "$(dirname "$0")/.."
before="$1"
after="$2"
duration="${3:-10s}"
executors="${4:-1000}"
tasks="${5:-20000}"
for bin in "$before" "$after"; do
    [ -x "$bin" ] || { echo "error: $bin is not an executable colony binary" >&2; exit 1; }
done
for bin in "$before" "$after" "$before"; do
    echo "######## $bin"
    COLONY_BIN="$bin" cluster/bench.sh "$duration"
    COLONY_BIN="$bin" cluster/bench-schedule.sh "$executors" "$tasks"
done
