#!/usr/bin/env bash
# A CUDA toolchain for `cargo build --features cuda` on a machine without the CUDA
# toolkit or a GPU: NVIDIA's PyPI wheels unpacked into one folder. Prints the
# environment to export; nothing else is changed.
#
#   eval "$(scripts/cuda-toolkit.sh)"            # default folder: ~/.local/share/audiocap/cuda-13.0
#   cargo build --release --features cuda
#
# What a build needs, and why this version:
# - nvcc, cicc, ptxas, the runtime headers and CCCL compile candle's kernels. candle
#   loads most of them as PTX that the *driver* compiles when the program starts, and
#   a driver refuses PTX from a newer toolkit than its own (CUDA_ERROR_UNSUPPORTED_
#   PTX_VERSION). So the toolkit must not be newer than the GPU machine's driver:
#   CUDA_VERSION (default 13.0, what driver 580 supports; `nvidia-smi` shows the
#   driver's) picks the wheels.
# - candle links cudarc dynamically: the link step needs libcudart, libcublas(Lt),
#   libcurand and libnvrtc (from their wheels; at run time the GPU machine's own copies,
#   e.g. PyTorch's nvidia/cu13/lib, are used) and libcuda, the driver library, which no
#   wheel carries: a link stub with its SONAME (libcuda.so.1) is generated from the
#   driver functions cudarc declares, as the toolkit's own stubs/libcuda.so is. At run
#   time the driver's real libcuda.so.1 is loaded.
#
# CUDA_COMPUTE_CAP defaults to 90 (H100/H200); set it for other GPUs (80 = A100, 89 = L4).
set -euo pipefail

version="${CUDA_VERSION:-13.0}"
dest="${1:-${AUDIOCAP_HOME:-$HOME/.local/share/audiocap}/cuda-$version}"
home="$dest/nvidia/cu13"
pin="==$version.*"
if [ ! -x "$home/bin/nvcc" ] || [ ! -e "$home/lib/libcuda.so" ]; then
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    python3 -m pip download --quiet --no-deps -d "$tmp" \
        "nvidia-cuda-nvcc$pin" "nvidia-cuda-runtime$pin" "nvidia-cuda-cccl$pin" \
        "nvidia-nvvm$pin" "nvidia-cuda-crt$pin" "nvidia-cuda-nvrtc$pin" \
        "nvidia-cublas" "nvidia-curand" >&2
    mkdir -p "$dest"
    for wheel in "$tmp"/*.whl; do
        python3 -m zipfile -e "$wheel" "$dest" >&2
    done
    chmod +x "$home"/bin/* "$home"/nvvm/bin/*
    # Unversioned names for the linker (-lcublas finds libcublas.so).
    for lib in "$home"/lib/lib*.so.*; do
        name="${lib##*/}"
        base="${name%%.so.*}"
        [ -e "$home/lib/$base.so" ] || ln -s "$name" "$home/lib/$base.so"
    done
    # The driver's link stub: every cu* driver function cudarc declares, empty.
    header="$home/include/cuda.h"
    grep -oE '\bCUresult CUDAAPI cu[A-Za-z0-9_]+' "$header" | awk '{print $3}' | sort -u |
        awk '{print "void " $1 "(void) {}"}' >"$tmp/libcuda-stub.c"
    # Versioned entry points (cuMemAlloc_v2...) are #defines in cuda.h: add them too.
    grep -oE '#define cu[A-Za-z0-9_]+ +cu[A-Za-z0-9_]+_v[0-9]+' "$header" | awk '{print $3}' |
        sort -u | awk '{print "void " $1 "(void) {}"}' >>"$tmp/libcuda-stub.c"
    sort -u -o "$tmp/libcuda-stub.c" "$tmp/libcuda-stub.c"
    cc -shared -fPIC -o "$home/lib/libcuda.so" -Wl,-soname,libcuda.so.1 "$tmp/libcuda-stub.c"
fi
"$home/bin/nvcc" --version >&2
cuda_version_number=$(("${version%%.*}" * 1000 + "${version#*.}" * 10))
cat <<ENV
export CUDA_HOME="$home" CUDA_PATH="$home" CUDA_ROOT="$home"
export PATH="$home/bin:\$PATH"
export CUDA_COMPUTE_CAP="\${CUDA_COMPUTE_CAP:-90}"
export CUDARC_CUDA_VERSION=$cuda_version_number
ENV
