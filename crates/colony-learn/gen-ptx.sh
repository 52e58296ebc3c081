#!/usr/bin/env bash
# Regenerates kernels/ptx/colony_kernels.ptx from kernels/*.cu with NVRTC 13.0 for compute_90, so
# the checked-in PTX is reproducible. NVRTC 13.0 matches the GPU machines' CUDA 13.0 driver
# (PTX from a newer NVRTC does not load there). Needs no GPU: NVRTC comes from PyPI's
# nvidia-cuda-nvrtc wheel, installed into a cache directory if it is not there yet.
# Afterwards `cargo test -p colony-learn` (with the same LD_LIBRARY_PATH) checks the PTX matches.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
nvrtc_version="13.0.88"
nvrtc_dir="${COLONY_NVRTC_DIR:-$HOME/.cache/colony/nvrtc}"
nvrtc_lib="$nvrtc_dir/nvidia/cu13/lib"

if [[ ! -e "$nvrtc_lib/libnvrtc.so.13" ]]; then
    python3 -m pip install --quiet --no-deps --target "$nvrtc_dir" "nvidia-cuda-nvrtc==$nvrtc_version"
fi

cd "$here"
LD_LIBRARY_PATH="$nvrtc_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    cargo run --release -p colony-learn --example gen_ptx -- "$here/kernels/ptx/colony_kernels.ptx"
