#!/usr/bin/env bash
# Installs the ONNX Runtime shared library that audiocap loads at run time.
#
# audiocap uses `ort` with `load-dynamic`: it opens libonnxruntime.so when it starts
# instead of linking it. This script takes that library from the official PyPI wheel
# (`onnxruntime` for the CPU, `onnxruntime-gpu` for CUDA 13) and installs it where
# audiocap looks for it by itself (see src/engine/runtime/library.rs):
#
#   ${AUDIOCAP_HOME:-$HOME/.local/share/audiocap}/onnxruntime/
#     VERSION                          the wheel it came from, e.g. onnxruntime==1.31.1
#     lib/libonnxruntime.so.1.31.1     the library
#     lib/libonnxruntime.so(.1)        links to it
#     lib/libonnxruntime_providers_*.so  execution-provider libraries (CUDA with --gpu)
#
# One variant is installed at a time: --gpu replaces a CPU install and the other way
# round. Running it again with the same variant and version does nothing.
#
# Usage: scripts/setup-onnxruntime.sh [--gpu | --cpu] [--version V]
# Needs python3 (or python) with pip, and access to PyPI (or a pip mirror).
set -euo pipefail

default_version=1.31.1
version=$default_version
variant=cpu

usage() {
    sed -n '2,19p' "$0" | sed 's/^# \{0,1\}//'
}

while [ $# -gt 0 ]; do
    case "$1" in
        --gpu) variant=gpu ;;
        --cpu) variant=cpu ;;
        --version)
            if [ $# -lt 2 ] || [ -z "$2" ]; then
                echo "setup-onnxruntime: --version needs a value, e.g. --version $default_version" >&2
                exit 2
            fi
            version=$2
            shift
            ;;
        --version=*) version=${1#--version=} ;;
        -h | --help)
            usage
            exit 0
            ;;
        *)
            echo "setup-onnxruntime: unknown argument '$1'" >&2
            echo "usage: scripts/setup-onnxruntime.sh [--gpu | --cpu] [--version V]" >&2
            exit 2
            ;;
    esac
    shift
done

case "$version" in
    1.*.*) ;;
    *)
        echo "setup-onnxruntime: '$version' is not an ONNX Runtime release (expected 1.MINOR.PATCH, e.g. $default_version)" >&2
        exit 2
        ;;
esac
minor=$(echo "$version" | cut -d. -f2)
if [ "$minor" -lt 31 ] 2>/dev/null; then
    echo "setup-onnxruntime: audiocap's ort (API 31) needs ONNX Runtime 1.31 or newer, not $version" >&2
    exit 2
fi

if [ "$variant" = gpu ]; then
    package=onnxruntime-gpu
else
    package=onnxruntime
fi
want="$package==$version"

if [ -n "${AUDIOCAP_HOME:-}" ]; then
    base=$AUDIOCAP_HOME
elif [ -n "${HOME:-}" ]; then
    base=$HOME/.local/share/audiocap
else
    echo "setup-onnxruntime: neither AUDIOCAP_HOME nor HOME is set; set AUDIOCAP_HOME to choose where to install" >&2
    exit 1
fi
root=$base/onnxruntime
library=$root/lib/libonnxruntime.so.$version

report() {
    echo "ONNX Runtime ($1) in $root"
    echo "audiocap finds it there by itself; to point it (or other tools) at it explicitly:"
    echo "export ORT_DYLIB_PATH=$library"
    if [ "$variant" = gpu ]; then
        echo "The CUDA execution provider also needs the CUDA 13 runtime, cuBLAS, cuFFT, cuRAND, NVRTC and cuDNN 9"
        echo "libraries on the loader path (a CUDA 13 toolkit, or: pip install 'onnxruntime-gpu[cuda,cudnn]==$version')."
    fi
    echo "Check with: audiocap doctor"
}

if [ -f "$root/VERSION" ] && [ "$(cat "$root/VERSION")" = "$want" ] && [ -f "$library" ]; then
    report "$want, already installed"
    exit 0
fi

python=
for candidate in python3 python; do
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -m pip --version >/dev/null 2>&1; then
        python=$candidate
        break
    fi
done
if [ -z "$python" ]; then
    echo "setup-onnxruntime: needs python3 (or python) with pip to download the $package wheel." >&2
    echo "Alternatively download $package-$version's wheel from https://pypi.org/project/$package/$version/#files," >&2
    echo "unzip onnxruntime/capi/libonnxruntime.so.$version from it and set ORT_DYLIB_PATH to that file." >&2
    exit 1
fi

mkdir -p "$base"
download=$(mktemp -d)
# The new install is assembled beside the old one, so that the swap below is a rename.
stage=$(mktemp -d "$base/.onnxruntime.new.XXXXXX")
chmod 755 "$stage"
trap 'rm -rf "$download" "$stage"' EXIT

echo "Downloading $want (wheel only, no dependencies) ..."
if ! "$python" -m pip download --quiet --no-deps --only-binary=:all: --dest "$download" "$want"; then
    # This interpreter may be one the wheels are not built for (they need CPython 3.11+):
    # the library inside is the same for every Python version, so ask for a CPython 3.12 wheel.
    arch=$(uname -m)
    echo "Retrying with an explicit platform (CPython 3.12, manylinux $arch) ..."
    "$python" -m pip download --quiet --no-deps --only-binary=:all: --dest "$download" \
        --implementation cp --python-version 3.12 \
        --platform "manylinux_2_28_$arch" --platform "manylinux_2_27_$arch" \
        --platform "manylinux_2_17_$arch" --platform "manylinux2014_$arch" \
        "$want"
fi

wheel=$(find "$download" -maxdepth 1 -name '*.whl' | head -n 1)
if [ -z "$wheel" ]; then
    echo "setup-onnxruntime: pip reported success but left no wheel in $download" >&2
    exit 1
fi

mkdir -p "$stage/lib"
# Extract onnxruntime/capi/libonnxruntime*.so* (the library and its provider libraries).
"$python" - "$wheel" "$stage/lib" <<'EOF'
import os, shutil, sys, zipfile

wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as archive:
    names = [
        n for n in archive.namelist()
        if n.startswith("onnxruntime/capi/libonnxruntime") and ".so" in os.path.basename(n)
    ]
    for name in names:
        target = os.path.join(dest, os.path.basename(name))
        with archive.open(name) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.chmod(target, 0o755)
        print("  " + os.path.basename(name))
if not names:
    sys.exit(f"no onnxruntime/capi/libonnxruntime*.so* in {wheel}")
EOF

if [ ! -f "$stage/lib/libonnxruntime.so.$version" ]; then
    echo "setup-onnxruntime: $(basename "$wheel") has no onnxruntime/capi/libonnxruntime.so.$version; it holds:" >&2
    ls "$stage/lib" >&2
    exit 1
fi
if [ "$variant" = gpu ] && [ ! -f "$stage/lib/libonnxruntime_providers_cuda.so" ]; then
    echo "setup-onnxruntime: $(basename "$wheel") has no libonnxruntime_providers_cuda.so" >&2
    exit 1
fi

ln -sf "libonnxruntime.so.$version" "$stage/lib/libonnxruntime.so.1"
ln -sf "libonnxruntime.so.$version" "$stage/lib/libonnxruntime.so"
echo "$want" >"$stage/VERSION"

# Swap the new install in; a process that still has the old library open keeps its copy.
if [ -e "$root" ]; then
    old=$(mktemp -d "$base/.onnxruntime.old.XXXXXX")
    mv "$root" "$old/onnxruntime"
    mv "$stage" "$root"
    rm -rf "$old"
else
    mv "$stage" "$root"
fi

report "$want"
