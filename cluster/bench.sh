#!/usr/bin/env bash
# Colony against etcd, side by side on this machine, in one run:
#   1. three etcd members on loopback, `etcdctl check perf --load=l` (500 clients) and `--load=m`;
#   2. three colony servers on loopback, `colony bench submit`: an open-loop 1,000 submissions/s
#      run for latency, then 500 clients in a closed loop over 16 connections per server (through
#      every server, then the leader), and through the leader over one connection.
# Usage: cluster/bench.sh [DURATION, default 10s]
set -euo pipefail
cd "$(dirname "$0")/.."
duration="${1:-10s}"
source cluster/setup.sh
# COLONY_BIN runs another build (cluster/bench-compare.sh compares two); otherwise build this one
# with the workspace's one feature resolution, so nothing is recompiled for the benchmark.
if [ -z "${COLONY_BIN:-}" ]; then
    cargo build --release --workspace --all-targets
fi
colony="${COLONY_BIN:-$CARGO_TARGET_DIR/release/colony}"

echo "== etcd (reference): etcdctl check perf --load=l"
cluster/bench-etcd.sh l
echo
echo "== etcd (reference): etcdctl check perf --load=m"
cluster/bench-etcd.sh m
echo

source cluster/bench-cluster.sh
start_bench_cluster 17101
# The open-loop run goes first, on a fresh cluster: servers keep every task in memory, so the
# resident size it reports is for the tasks that run submitted, not for the closed-loop runs'.
echo "== colony: bench submit, open loop at 1,000 submissions/s, every server"
"$colony" --endpoint "$endpoints" bench submit --clients 64 --rate 1000 --duration "$duration"
echo
# 500 clients over 16 connections per server (etcdctl's check perf gives each of its 500 clients
# its own), then over one: a connection is served by one task on the server, so one connection
# measures that task as much as the cluster. A build from before `--connections` uses one.
term() {
    "$colony" --endpoint "$endpoints" cluster status --output json |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["term"])'
}
term_before=$(term)
connections=()
if "$colony" bench submit --help | grep -q -- --connections; then
    connections=(--connections 16)
fi
echo "== colony: bench submit, 500 clients, closed loop, every server, ${connections[1]:-1} connections each"
"$colony" --endpoint "$endpoints" bench submit --clients 500 "${connections[@]}" --duration "$duration"
echo
echo "== colony: bench submit, 500 clients, closed loop, leader only, ${connections[1]:-1} connections"
"$colony" --endpoint 127.0.0.1:17101 bench submit --clients 500 "${connections[@]}" --duration "$duration"
echo
if [ ${#connections[@]} -gt 0 ]; then
    echo "== colony: bench submit, 500 clients, closed loop, leader only, 1 connection"
    "$colony" --endpoint 127.0.0.1:17101 bench submit --clients 500 --duration "$duration"
    echo
fi
# Each election raises the term: under this load there should be none.
echo "== leader elections during the closed-loop runs: $(( $(term) - term_before ))"
echo
"$colony" --endpoint "$endpoints" cluster status
