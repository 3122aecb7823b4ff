#!/usr/bin/env bash
# A CUDA compiler for `cargo build --features cuda` (candle's kernels need nvcc at
# build time) on a machine without the CUDA toolkit: NVIDIA's PyPI wheels (nvcc,
# cicc, runtime headers, CCCL) unpacked into one folder. Prints the environment to
# export; nothing else is changed.
#
#   eval "$(scripts/cuda-toolkit.sh)"            # default folder: ~/.local/share/audiocap/cuda
#   cargo build --release --features cuda
#
# CUDA_COMPUTE_CAP defaults to 90 (H100/H200); set it for other GPUs (80 = A100, 89 = L4).
# cudarc 0.19.10 knows CUDA up to 13.4; the wheels are 13.5, so the version is pinned
# with CUDARC_CUDA_VERSION (the driver API it binds is the same).
set -euo pipefail

dest="${1:-${AUDIOCAP_HOME:-$HOME/.local/share/audiocap}/cuda}"
home="$dest/nvidia/cu13"
if [ ! -x "$home/bin/nvcc" ]; then
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    python3 -m pip download --quiet --no-deps -d "$tmp" \
        nvidia-cuda-nvcc nvidia-cuda-runtime nvidia-cuda-cccl nvidia-nvvm nvidia-cuda-crt >&2
    mkdir -p "$dest"
    for wheel in "$tmp"/*.whl; do
        python3 -m zipfile -e "$wheel" "$dest" >&2
    done
    chmod +x "$home"/bin/* "$home"/nvvm/bin/*
fi
"$home/bin/nvcc" --version >&2
cat <<ENV
export CUDA_HOME="$home" CUDA_PATH="$home" CUDA_ROOT="$home"
export PATH="$home/bin:\$PATH"
export CUDA_COMPUTE_CAP="\${CUDA_COMPUTE_CAP:-90}"
export CUDARC_CUDA_VERSION=13040
ENV
