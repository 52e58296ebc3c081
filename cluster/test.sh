#!/usr/bin/env bash
# Installs what is missing, builds, and runs the whole test suite: unit, property, storage-suite
# and real-process integration tests. Used as-is by CI (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
source cluster/setup.sh
# One feature resolution for everything: `--workspace --all-targets` builds the `colony` binary the
# integration tests run and every test, so RocksDB's C++ is compiled once, not once per command.
cargo build --release --workspace --all-targets
cargo test --release --workspace -- --test-threads 2
