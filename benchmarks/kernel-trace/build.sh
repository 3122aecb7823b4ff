#!/usr/bin/env bash
# Builds libkernel-trace.so (kernel_trace.cpp: GPU time per CUDA kernel of any process,
# through a CUPTI injection) on a machine without CUDA: the headers come from NVIDIA's
# PyPI wheels (CUPTI, the CUDA runtime and its crt headers, CUDA_VERSION default 13.0, the version the
# GPU machine's PyTorch carries), the library links against the wheel's libcupti and
# finds the GPU machine's own copy at run time (beside PyTorch: nvidia/cu13/lib), or
# the wheel's, copied beside it.
#
#   benchmarks/kernel-trace/build.sh [OUT_DIR]     # default: target/kernel-trace
#
# Use:  CUDA_INJECTION64_PATH=/abs/libkernel-trace.so KERNEL_TRACE_OUT=kernels.tsv CMD
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
version="${CUDA_VERSION:-13.0}"
out="${1:-$here/../../target/kernel-trace}"
wheels="${AUDIOCAP_HOME:-$HOME/.local/share/audiocap}/cupti-$version"
if [ ! -e "$wheels/nvidia/cu13/include/cupti.h" ] || [ ! -e "$wheels/nvidia/cu13/include/crt/host_defines.h" ]; then
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    python3 -m pip download --quiet --no-deps -d "$tmp" \
        "nvidia-cuda-cupti==$version.*" "nvidia-cuda-runtime==$version.*" \
        "nvidia-cuda-crt==$version.*" >&2
    mkdir -p "$wheels"
    for wheel in "$tmp"/*.whl; do
        python3 -m zipfile -e "$wheel" "$wheels" >&2
    done
fi
lib="$wheels/nvidia/cu13/lib"
[ -e "$lib/libcupti.so" ] || ln -s libcupti.so.13 "$lib/libcupti.so"
mkdir -p "$out"
# libcupti is looked up on LD_LIBRARY_PATH first (the GPU machine's own, beside
# PyTorch), then beside the library (the wheel's copy, put there as a fallback).
g++ -std=c++17 -O2 -shared -fPIC -fvisibility=hidden \
    -I "$wheels/nvidia/cu13/include" \
    -o "$out/libkernel-trace.so" "$here/kernel_trace.cpp" \
    -L "$lib" -lcupti -Wl,-rpath,'$ORIGIN'
cp "$lib/libcupti.so.13" "$out/"
echo "$(cd "$out" && pwd)/libkernel-trace.so"
