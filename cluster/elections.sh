#!/usr/bin/env bash
# Leader changes under load: three colony servers on loopback (default Raft settings, or
# $COLONY_SERVER_ARGS), then `colony bench submit --clients 500` for 60 s in all: 30 s over 16
# connections to the leader, 15 s over one, 15 s over 16 connections to every server. Prints each
# run's throughput and the number of elections (term changes) during the 60 s.
# Usage: cluster/elections.sh [PORT, default 7400]
set -euo pipefail
cd "$(dirname "$0")/.."
port="${1:-7400}"
source cluster/setup.sh
if [ -z "${COLONY_BIN:-}" ]; then
    cargo build --release --workspace --all-targets
fi
colony="${COLONY_BIN:-$CARGO_TARGET_DIR/release/colony}"
source cluster/bench-cluster.sh
start_bench_cluster "$port"
term() {
    "$colony" --endpoint "$endpoints" cluster status --output json |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["term"])'
}
rate() { grep tasks/s | awk '{print $2}'; }
before=$(term)
leader16=$("$colony" --endpoint "127.0.0.1:$port" bench submit --clients 500 --connections 16 --duration 30s 2>&1 | rate)
leader1=$("$colony" --endpoint "127.0.0.1:$port" bench submit --clients 500 --duration 15s 2>&1 | rate)
every16=$("$colony" --endpoint "$endpoints" bench submit --clients 500 --connections 16 --duration 15s 2>&1 | rate)
echo "tasks/s: leader, 16 connections ${leader16}; leader, 1 connection ${leader1}; every server, 16 connections ${every16}"
echo "elections during the 60 s: $(( $(term) - before ))"
