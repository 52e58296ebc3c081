#!/usr/bin/env bash
# What containment costs, measured in one run: three colony servers on loopback and two real
# executors running `/bin/true` tasks, first contained (a cgroup per attempt with memory, CPU and
# pids limits, the task as `nobody`, a clean environment), then with `--unsafe-no-limits` (no
# cgroups), alternating ROUNDS times. Each run releases a backlog of tasks at once and reports
# tasks/s through the two executors (first to last completion) and each attempt's start latency
# (accepted assignment to process running: working directory, cgroup, user switch, spawn; p50
# and p99 from the executors' `colony_executor_attempt_start_seconds` histograms).
# Usage: cluster/bench-containment.sh [BACKLOG SECONDS, default 2] [ROUNDS, default 2]
set -euo pipefail
cd "$(dirname "$0")/.."
backlog="${1:-2}"
rounds="${2:-2}"
source cluster/setup.sh
if [ -z "${COLONY_BIN:-}" ]; then
    cargo build --release --workspace --all-targets
fi
colony="${COLONY_BIN:-$CARGO_TARGET_DIR/release/colony}"
source cluster/bench-cluster.sh
start_bench_cluster 17301
chmod 711 "$dir"
echo "== $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(uname -r), cgroups $(stat -fc %T /sys/fs/cgroup)"

# From the cluster's status: `tasks` (all tasks), `open` (not finished) or one state's count.
count() {
    "$colony" --endpoint "$endpoints" --timeout 5s cluster status --output json \
        | python3 -c '
import json, sys
s, what = json.load(sys.stdin), sys.argv[1]
by = s["tasks_by_state"]
if what == "tasks": print(s["task_count"])
elif what == "open": print(sum(by.get(k, 0) for k in ("blocked", "pending", "assigned", "running")))
else: print(by.get(what, 0))' "$1"
}

# p50 and p99 (linear within a bucket) of one histogram summed over the executors' expositions.
quantiles() {
    python3 - "$@" <<'EOF'
import sys, urllib.request
buckets = {}
for addr in sys.argv[1:]:
    text = urllib.request.urlopen(f"http://{addr}/metrics").read().decode()
    for line in text.splitlines():
        if line.startswith("colony_executor_attempt_start_seconds_bucket"):
            le = line.split('le="')[1].split('"')[0]
            buckets[le] = buckets.get(le, 0) + float(line.rsplit(" ", 1)[1])
edges = sorted((float(le), n) for le, n in buckets.items() if le != "+Inf")
total = buckets.get("+Inf", 0)
def q(p):
    want, lo, below = p * total, 0.0, 0.0
    for edge, n in edges:
        if n >= want:
            return lo + (edge - lo) * ((want - below) / max(n - below, 1e-9))
        lo, below = edge, n
    return float("inf")
print(f"{int(total)} {q(0.5) * 1000:.2f} {q(0.99) * 1000:.2f}")
EOF
}

run_once() {
    local mode="$1" round="$2" load="$3" flag="" offset=0
    if [ "$mode" = "no-cgroups" ]; then flag="--unsafe-no-limits"; offset=5; fi
    [ "$load" = light ] && offset=$((offset + 100))
    local token
    token=$("$colony" --endpoint "$endpoints" --timeout 10s cluster token create --kind executor --ttl 10m 2>/dev/null)
    local addrs=() epids=()
    for i in 1 2; do
        local port=$((17350 + i + 10 * round + offset))
        "$colony" executor --join "$endpoints" --token "$token" --data-dir "$dir/$mode-$load-$round-e$i" \
            --name "$mode-$load-$round-e$i" --cpu 8 --memory 16Gi --metrics-listen "127.0.0.1:$port" \
            $flag >"$dir/$mode-$load-$round-e$i.log" 2>&1 &
        epids+=($!)
        pids+=($!)
        addrs+=("127.0.0.1:$port")
    done
    for _ in $(seq 1 100); do
        up=$("$colony" --endpoint "$endpoints" --timeout 5s cluster status --output json \
            | python3 -c 'import json,sys; print(json.load(sys.stdin)["executors_by_state"].get("up", 0))')
        [ "$up" = 2 ] && break
        sleep 0.2
    done
    local before tasks_before submitted
    before=$(count succeeded)
    tasks_before=$(count tasks)
    if [ "$load" = light ]; then
        "$colony" --endpoint "$endpoints" --output json bench submit --clients 4 --rate 20 --duration 5s >/dev/null 2>&1
    else
        # The backlog: closed-loop submissions for BACKLOG seconds (after a 1 s warmup, also sent).
        "$colony" --endpoint "$endpoints" --output json bench submit --clients 64 --duration "${backlog}s" >/dev/null 2>&1
    fi
    submitted=$(( $(count tasks) - tasks_before ))
    local first="" last="" done=0 now
    while :; do
        now=$(date +%s.%N)
        done=$(( $(count succeeded) - before ))
        [ -z "$first" ] && [ "$done" -gt 0 ] && first="$now"
        if [ "$(count open)" = 0 ]; then last="$now"; break; fi
        sleep 0.1
    done
    # Tasks that finished between the two reads above.
    done=$(( $(count succeeded) - before ))
    if [ "$done" -lt "$submitted" ]; then
        echo "$mode $load round $round: $((submitted - done)) of $submitted tasks did not succeed; logs in $dir" >&2
    fi
    read -r attempts p50 p99 < <(quantiles "${addrs[@]}")
    python3 -c "import sys; n,a,b=int(sys.argv[1]),float(sys.argv[2]),float(sys.argv[3]); r=str(round(n/(b-a))) if b > a else '-'; print(f'{sys.argv[4]:<11} {sys.argv[9]:<9} round {sys.argv[5]}: {n:>6} tasks, {r:>7} tasks/s, start latency p50 {sys.argv[6]} ms, p99 {sys.argv[7]} ms ({sys.argv[8]} attempts)')" \
        "$done" "$first" "$last" "$mode" "$round" "$p50" "$p99" "$attempts" "$load"
    kill "${epids[@]}" 2>/dev/null || true
    wait "${epids[@]}" 2>/dev/null || true
    # The drained executors stay in the cluster as down; the next run's two are new.
}

echo "== 2 executors (8 cores, 16 GiB offered each), /bin/true tasks of 100m and 64Mi, backlog of ${backlog} s of closed-loop submissions"
for round in $(seq 1 "$rounds"); do
    for load in light saturated; do
        run_once cgroups "$round" "$load"
        run_once no-cgroups "$round" "$load"
    done
done
echo "(light: 20 tasks/s offered, done by the time submitting ends; saturated: what the two executors sustain)"
