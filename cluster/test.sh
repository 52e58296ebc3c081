#!/usr/bin/env bash
# Installs what is missing, builds, and runs the whole test suite: unit, property, storage-suite,
# real-process integration tests and the Prometheus rule tests. Used as-is by CI (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
source cluster/setup.sh
# promtool (Debian's prometheus package) checks the alert rules and every process's /metrics.
if ! command -v promtool >/dev/null 2>&1; then
    echo "installing: prometheus (for promtool)" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus >&2
fi
promtool check rules cluster/prometheus/alerts.yml
promtool test rules cluster/prometheus/alerts_test.yml
# grpcio and opentelemetry-proto for the OTLP receiver the tracing test sends spans to
# (tests/otlp/receiver.py; the OpenTelemetry Collector is not installable here).
otlp_dir="$HOME/.cache/colony/otlp"
if ! PYTHONPATH="$otlp_dir" python3 -c "import grpc, opentelemetry.proto.collector.trace.v1" >/dev/null 2>&1; then
    echo "installing: grpcio opentelemetry-proto (into $otlp_dir)" >&2
    python3 -m pip install --quiet --target "$otlp_dir" grpcio opentelemetry-proto >&2
fi
# NVRTC 13.0 from PyPI lets the kernel tests compile every CUDA kernel for sm_90 (and check the
# checked-in PTX) without a GPU; without it those tests print SKIPPED and the CPU path is tested alone.
nvrtc_dir="$HOME/.cache/colony/nvrtc"
if [ ! -e "$nvrtc_dir/nvidia/cu13/lib/libnvrtc.so.13" ]; then
    python3 -m pip install --quiet --no-deps --target "$nvrtc_dir" nvidia-cuda-nvrtc==13.0.88 >&2 \
        || echo "NVRTC wheel unavailable: the kernel compile tests will say SKIPPED" >&2
fi
export LD_LIBRARY_PATH="$nvrtc_dir/nvidia/cu13/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# One feature resolution for everything: `--workspace --all-targets` builds the `colony` binary the
# integration tests run and every test, so RocksDB's C++ is compiled once, not once per command.
cargo build --release --workspace --all-targets
# Formatting and lints are part of the suite. clippy in release mode reuses the build above.
cargo fmt --all --check
cargo clippy --release --workspace --all-targets -- -D warnings
cargo test --release --workspace -- --test-threads 2
# The deployment files: systemd units (systemd-analyze verify) and Kubernetes manifests (against
# the Kubernetes schemas, offline); both also check each config key is a flag of the binary.
cluster/systemd/verify.sh
cluster/k8s/validate.sh
# The web console in headless Chromium against a real `colony dev` cluster (screenshots into docs/).
COLONY_SKIP_BUILD=1 tests/console/run.sh
# The chaos suite, CI-sized: every nemesis once or more in about three minutes, then the negative
# control, which must be caught (servers serving stale reads make the history non-linearizable).
# Needs root for network namespaces; it says so and fails rather than skip.
chaos_dir="$(mktemp -d /tmp/colony-chaos-ci.XXXXXX)"
# Tasks run as nobody and append to the run's ledger: let them through (not list) the directory.
chmod 711 "$chaos_dir"
COLONY_SKIP_BUILD=1 chaos/run --servers 3 --executors 3 --duration 190s --fault-time 5s \
    --seed "${COLONY_CHAOS_SEED:-42}" --nemesis all --dir "$chaos_dir/all"
echo "chaos: the negative control follows; its run must end INVALID (the error line below is expected)" >&2
if COLONY_SKIP_BUILD=1 chaos/run --duration 20s --seed 7 --negative-control stale-reads --dir "$chaos_dir/negative"; then
    echo "error: the negative control (stale reads) passed the checkers" >&2
    exit 1
fi
grep -q '"negative_control_caught": true' "$chaos_dir/negative/report.json" \
    || { echo "error: the negative-control run failed for another reason; see $chaos_dir/negative" >&2; exit 1; }
echo "chaos: all nemeses valid, negative control caught ($chaos_dir)"
