#!/usr/bin/env bash
# Installs what building Colony needs when it is missing, and points cargo at a build directory
# outside the clone so a fresh clone reuses earlier builds (RocksDB's C++ alone is ~15 minutes).
# Sourced by cluster/dev.sh and cluster/test.sh.
set -euo pipefail

missing=()
command -v clang >/dev/null 2>&1 || missing+=(clang)
dpkg -s libclang-dev >/dev/null 2>&1 || missing+=(libclang-dev)
command -v cc >/dev/null 2>&1 || missing+=(build-essential)
# The demo workflow's steps (examples/research.yaml) and the Python client test run python3.
command -v python3 >/dev/null 2>&1 || missing+=(python3)
# The font `colony bench soak` draws its plot's text with (and its test).
dpkg -s fonts-dejavu-core >/dev/null 2>&1 || missing+=(fonts-dejavu-core)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "installing: ${missing[*]}" >&2
    if [ "$(id -u)" -ne 0 ]; then
        echo "error: need root (or sudo) to install ${missing[*]}" >&2
        exit 1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >&2
fi

# grpcio and grpcio-tools for the Python examples (examples/python, examples/agents) and their
# tests. Agents run as nobody, so as root it goes where every user reads it.
if [ "$(id -u)" -eq 0 ]; then
    export COLONY_PYTHONPATH="${COLONY_PYTHONPATH:-/opt/colony/python}"
else
    export COLONY_PYTHONPATH="${COLONY_PYTHONPATH:-$HOME/.cache/colony/python}"
fi
if ! PYTHONPATH="$COLONY_PYTHONPATH" python3 -c "import grpc, grpc_tools" >/dev/null 2>&1; then
    echo "installing: grpcio grpcio-tools (into $COLONY_PYTHONPATH)" >&2
    python3 -m pip install --quiet --target "$COLONY_PYTHONPATH" grpcio grpcio-tools >&2
    chmod -R a+rX "$COLONY_PYTHONPATH"
fi

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/colony/target}"
mkdir -p "$CARGO_TARGET_DIR"
