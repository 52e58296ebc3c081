#!/usr/bin/env bash
# Workflows on this machine: three colony servers on loopback, then `colony bench workflow`:
# simulated executors (QUIC with mutual TLS, from one process; they run nothing but write each
# declared output) run WORKFLOWS chains of STEPS steps, each passing a 1 KiB output to the next;
# prints workflows/s and the step hand-off latency (a step's end at its executor to the next
# step's assignment at one).
# Usage: cluster/bench-workflow.sh [WORKFLOWS, default 1000] [STEPS, default 5]
set -euo pipefail
cd "$(dirname "$0")/.."
workflows="${1:-1000}"
steps="${2:-5}"
source cluster/setup.sh
# COLONY_BIN runs another build; otherwise build this one with the workspace's one feature
# resolution, so nothing is recompiled for the benchmark.
if [ -z "${COLONY_BIN:-}" ]; then
    cargo build --release --workspace --all-targets
fi
colony="${COLONY_BIN:-$CARGO_TARGET_DIR/release/colony}"

source cluster/bench-cluster.sh
start_bench_cluster 17301
echo "== colony: bench workflow, $workflows workflows of $steps chained steps, 1 KiB outputs"
"$colony" --endpoint "$endpoints" bench workflow --workflows "$workflows" --steps "$steps" --output-bytes 1024
