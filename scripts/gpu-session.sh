#!/usr/bin/env bash
# One GPU-machine session for both device checks (device tool, 64 MiB per call):
#
#   here:  scripts/gpu-session.sh pack [FILE...]  # after scripts/gpu-training-check.sh pack
#                                                 # and benchmarks/gpu-throughput.sh pack
#   there, once per part, back to back:       scripts/gpu-session.sh keep .gpu/session/pNN
#   there, last:                              scripts/gpu-session.sh run [train|perf|all]
#
# `pack` puts ONNX Runtime's CUDA build (.gpu/ort-part-*), the training check's and the
# throughput benchmark's packs into one stream cut into .gpu/session/pNN parts of 40 MiB
# (PART=...; a call carries the tracked tree too, 22 MiB, and may carry 64 in all). `keep`
# moves a carried part to /tmp/gpu-parts (the machine keeps /tmp while warm; a later
# call's working tree does not keep earlier carried files). `run` joins them, sets up
# ONNX Runtime's CUDA build and runs scripts/gpu-training-check.sh then
# benchmarks/gpu-throughput.sh, everything into $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
pack)
    rm -rf .gpu/session
    mkdir -p .gpu/session
    shift
    files=("$@")
    if [ ${#files[@]} -eq 0 ]; then
        files=(ort-part-00 ort-part-01 ort-part-02 ort-part-03 ort-part-04 assemble-ort-gpu.sh
            train/bin.tar.xz train/data.tar.xz perf/bin.tar.xz)
    fi
    tar -C .gpu -cf - "${files[@]}" | split -b "${PART:-40M}" -d - .gpu/session/p
    ls -la .gpu/session
    ;;
keep)
    mkdir -p /tmp/gpu-parts
    cp "$2" /tmp/gpu-parts/
    ls -la /tmp/gpu-parts
    ;;
run)
    mkdir -p .gpu
    cat /tmp/gpu-parts/p* | tar -C .gpu -xf -
    what=${2:-all}
    if [ "$what" != perf ]; then
        bash scripts/gpu-training-check.sh run || true
    fi
    if [ "$what" != train ]; then
        # shellcheck disable=SC1091
        . .gpu/assemble-ort-gpu.sh
        bash benchmarks/gpu-throughput.sh run
    fi
    ;;
*)
    echo "usage: $0 pack [FILE...] | keep PART | run [train|perf|all]" >&2
    exit 2
    ;;
esac
