#!/usr/bin/env bash
# The scheduler on this machine: three colony servers on loopback, then `colony bench schedule`:
# N simulated executors connect over QUIC with mutual TLS (from one process; they run nothing),
# a backlog of M tasks is released at once and placed (placements/s), then tasks are submitted
# open loop at 1,000/s and timed from submission to the assignment reaching an executor.
# Usage: cluster/bench-schedule.sh [EXECUTORS, default 1000] [TASKS, default 20000]
set -euo pipefail
cd "$(dirname "$0")/.."
executors="${1:-1000}"
tasks="${2:-20000}"
source cluster/setup.sh
# COLONY_BIN runs another build (cluster/bench-compare.sh compares two); otherwise build this one
# with the workspace's one feature resolution, so nothing is recompiled for the benchmark.
if [ -z "${COLONY_BIN:-}" ]; then
    cargo build --release --workspace --all-targets
fi
colony="${COLONY_BIN:-$CARGO_TARGET_DIR/release/colony}"

source cluster/bench-cluster.sh
start_bench_cluster 17201
echo "== colony: bench schedule, $executors simulated executors, a backlog of $tasks tasks, then 1,000 tasks/s"
# The gate holds the backlog back until it is all submitted: on two shared cores that can take
# longer than the default 10s.
"$colony" --endpoint "$endpoints" bench schedule --executors "$executors" --tasks "$tasks" --rate 1000 --hold 30s
echo
"$colony" --endpoint "$endpoints" cluster status | head -3
# Every declaration, from the servers' logs (the benchmark's poll can miss a short one). No
# simulated executor fails, so each is a false alarm.
declared=$(cat "$dir"/s*.log | grep -c "executor declared down" || true)
echo "executors declared down (servers' logs): $declared"
{ grep -h "executor declared down" "$dir"/s*.log || true; } | sed 's/.*declared down: //' | head -5
