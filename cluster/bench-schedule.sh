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
cargo build --release --bin colony
colony="$CARGO_TARGET_DIR/release/colony"

dir="$(mktemp -d /tmp/colony-bench-schedule.XXXXXX)"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT
"$colony" server --id 1 --data-dir "$dir/d1" --listen 127.0.0.1:17201 --bootstrap >"$dir/s1.log" 2>&1 &
pids+=($!)
for i in 2 3; do
    "$colony" server --id "$i" --data-dir "$dir/d$i" --listen "127.0.0.1:1720$i" --join 127.0.0.1:17201 >"$dir/s$i.log" 2>&1 &
    pids+=($!)
done
endpoints=127.0.0.1:17201,127.0.0.1:17202,127.0.0.1:17203
for _ in $(seq 1 100); do
    voters=$("$colony" --endpoint "$endpoints" --timeout 1s cluster status --output json 2>/dev/null | grep -c '"voter"' || true)
    [ "$voters" = 3 ] && break
    sleep 0.2
done
echo "== colony: bench schedule, $executors simulated executors, a backlog of $tasks tasks, then 1,000 tasks/s"
"$colony" --endpoint "$endpoints" bench schedule --executors "$executors" --tasks "$tasks" --rate 1000
echo
"$colony" --endpoint "$endpoints" cluster status | head -3
