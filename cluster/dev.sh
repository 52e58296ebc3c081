#!/usr/bin/env bash
# Installs what is missing, builds, and starts a local Colony cluster doing real work (`colony dev`).
# Extra arguments go to `colony dev` (see `colony dev --help`). Stop it with Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
source cluster/setup.sh
cargo build --release --workspace --all-targets
exec "$CARGO_TARGET_DIR/release/colony" dev --prometheus-targets cluster/prometheus/targets/dev.json "$@"
