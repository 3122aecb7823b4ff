#!/usr/bin/env bash
# Builds the audiocap container image (OCI) without any image registry: the base is
# made from Debian's packages (mmdebstrap of a slim bookworm rootfs, imported into
# buildah's storage) and the image is built with buildah from
# deploy/image/Containerfile (CPU) or deploy/image/Containerfile.cuda (CUDA).
#
#   scripts/build-image.sh [--cpu | --gpu] [--binary PATH] [--tag NAME:TAG] [--docker]
#
#   --cpu         (default) localhost/audiocap:VERSION: the audiocap binary, the ONNX
#                 Runtime library of the official onnxruntime wheel, the bundled model,
#                 samples and pipelines; `docker run IMAGE run pipelines/demo.toml` works
#   --gpu         localhost/audiocap:VERSION-cuda: onnxruntime-gpu's library and the
#                 CUDA 13 runtime, cuBLAS, cuFFT, cuRAND, NVRTC and cuDNN 9 libraries
#                 from NVIDIA's PyPI wheels (the driver comes from the GPU node)
#   --binary PATH put this audiocap executable in the image instead of the release
#                 build (`cargo build --release --locked`, the default); the tests
#                 pass the debug binary `cargo test` already built
#   --tag N:T     the image's name instead of the default above
#   --docker      build with `docker build` from the public debian:bookworm-slim image
#                 (a machine with Docker and a registry) instead of buildah
#   --print-tag   print the default name for the variant and exit
#
# Prepared files are kept under target/image/: the Debian rootfs tarball
# (base/bookworm-KEY.tar, KEY: a digest of its package list and options, built once
# per machine) and the downloaded wheels (wheels/). Needs python3 with pip (for the
# wheels), and for the default route, as root: buildah and mmdebstrap
# (apt-get install buildah mmdebstrap). STORAGE_DRIVER picks buildah's storage driver
# (default vfs: works everywhere, overlay is faster where the kernel allows it);
# BUILDAH_ISOLATION its isolation for RUN steps (default chroot).
set -euo pipefail
cd "$(dirname "$0")/.."

variant=cpu
binary=
tag=
builder=buildah
print_tag=
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) variant=cpu ;;
        --gpu) variant=gpu ;;
        --binary)
            [ $# -ge 2 ] || { echo "build-image: --binary needs a path" >&2; exit 2; }
            binary=$2
            shift
            ;;
        --tag)
            [ $# -ge 2 ] || { echo "build-image: --tag needs NAME:TAG" >&2; exit 2; }
            tag=$2
            shift
            ;;
        --docker) builder=docker ;;
        --print-tag) print_tag=1 ;;
        -h | --help)
            sed -n '2,29p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "build-image: unknown argument '$1' (see --help)" >&2
            exit 2
            ;;
    esac
    shift
done

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
ort_version=1.31.1
if [ "$variant" = gpu ]; then
    containerfile=deploy/image/Containerfile.cuda
    default_tag=localhost/audiocap:$version-cuda
else
    containerfile=deploy/image/Containerfile
    default_tag=localhost/audiocap:$version
fi
tag=${tag:-$default_tag}
if [ -n "$print_tag" ]; then
    echo "$default_tag"
    exit 0
fi

# The wheels the libraries come from (exact versions: the image is the same every
# time). onnxruntime-gpu 1.31.1 is built for CUDA 13; its provider links cudart,
# cuBLAS(Lt) and cuRAND and opens cuDNN, cuFFT and NVRTC when it needs them (the
# wheels its own `cuda` and `cudnn` extras name). The CUDA 13.0 releases of the
# toolkit's libraries: they run on every CUDA 13 driver (580 and newer).
cpu_wheels=("onnxruntime==$ort_version")
gpu_wheels=(
    "onnxruntime-gpu==$ort_version"
    nvidia-cuda-runtime==13.0.96
    nvidia-cuda-nvrtc==13.0.88
    nvidia-nvjitlink==13.0.88
    nvidia-cublas==13.0.2.14
    nvidia-cufft==12.0.0.61
    nvidia-curand==10.4.0.35
    nvidia-cudnn-cu13==9.28.1.4
)

arch=$(uname -m)
work=target/image
mkdir -p "$work/wheels" "$work/base"
context=$(mktemp -d "$PWD/$work/context.XXXXXX")
trap 'rm -rf "$context"' EXIT
started=$(date +%s)

# 1. The binary.
if [ -z "$binary" ]; then
    cargo build --release --locked
    binary=target/release/audiocap
fi
if [ ! -x "$binary" ]; then
    echo "build-image: $binary is not an executable" >&2
    exit 2
fi
opt=$context/opt/audiocap
mkdir -p "$opt/bin" "$opt/lib" "$opt/exported_models" "$opt/licenses"
cp "$binary" "$opt/bin/audiocap"
# Debug information is of no use in the image (a debug build's is most of its size).
if command -v strip >/dev/null 2>&1; then
    strip --strip-debug "$opt/bin/audiocap"
fi

# 2. The libraries, from the wheels (downloaded once into target/image/wheels).
wheel_file() { # the cached wheel of NAME==VERSION, if any
    local name=${1%%==*} v=${1#*==}
    find "$work/wheels" -maxdepth 1 -name "${name//-/_}-$v-*.whl" | head -n 1
}
wheels=("${cpu_wheels[@]}")
[ "$variant" = gpu ] && wheels=("${gpu_wheels[@]}")
for want in "${wheels[@]}"; do
    if [ -z "$(wheel_file "$want")" ]; then
        # Any CPython 3.12 manylinux wheel: the libraries inside are the same for
        # every Python, and the image does not depend on this machine's interpreter.
        platforms=()
        for p in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux_2_12 \
            manylinux2010 manylinux_2_5 manylinux1; do
            platforms+=(--platform "${p}_$arch")
        done
        python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$work/wheels" \
            --implementation cp --python-version 3.12 "${platforms[@]}" "$want"
    fi
done
# Unpacks the shared libraries (and licences) of each wheel: onnxruntime's into lib/,
# NVIDIA's into lib/cuda/.
files=()
for want in "${wheels[@]}"; do
    files+=("$(wheel_file "$want")")
done
python3 - "$opt" "$variant" "${files[@]}" <<'EOF'
import os, shutil, sys, zipfile

opt, variant, wheels = sys.argv[1], sys.argv[2], sys.argv[3:]
for wheel in wheels:
    dist = os.path.basename(wheel).split("-")[0]
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            base = os.path.basename(name)
            if name.startswith("onnxruntime/capi/libonnxruntime") and ".so" in base:
                # The TensorRT provider needs TensorRT, which the image does not carry.
                if "tensorrt" in base:
                    continue
                dest = os.path.join(opt, "lib")
            elif name.startswith("nvidia/") and "/lib/" in name and ".so" in base:
                dest = os.path.join(opt, "lib", "cuda")
            elif (".dist-info/" in name or name.count("/") == 1) and (
                "LICEN" in base.upper() or "NOTICE" in base.upper()
            ):
                dest = os.path.join(opt, "licenses", dist)
            else:
                continue
            os.makedirs(dest, exist_ok=True)
            with archive.open(name) as src, open(os.path.join(dest, base), "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.chmod(os.path.join(dest, base), 0o755 if ".so" in base else 0o644)
EOF
ln -s "libonnxruntime.so.$ort_version" "$opt/lib/libonnxruntime.so.1"
ln -s "libonnxruntime.so.$ort_version" "$opt/lib/libonnxruntime.so"
if [ ! -f "$opt/lib/libonnxruntime.so.$ort_version" ]; then
    echo "build-image: no libonnxruntime.so.$ort_version in the wheel" >&2
    exit 1
fi
if [ "$variant" = gpu ]; then
    # Every library the CUDA provider links must be in lib/cuda/, but the driver's
    # libcuda.so.1, which the GPU node provides.
    missing=$(LD_LIBRARY_PATH="$opt/lib/cuda" ldd "$opt/lib/libonnxruntime_providers_cuda.so" "$opt"/lib/cuda/*.so* |
        grep 'not found' | grep -v 'libcuda\.so\.1 ' | sort -u || true)
    if [ -n "$missing" ]; then
        echo "build-image: the CUDA libraries are incomplete:" >&2
        echo "$missing" >&2
        exit 1
    fi
    # ...and define every cuBLAS, CUDA runtime and cuRAND function it imports (the
    # pinned releases are not older than the ones it was built against).
    if command -v nm >/dev/null 2>&1; then
        imported=$(nm -D --undefined-only "$opt/lib/libonnxruntime_providers_cuda.so" |
            awk '$2 ~ /@(libcublas|libcublasLt|libcudart|libcurand)\./ {sub(/@.*/, "", $2); print $2}' | sort -u)
        defined=$(for lib in libcublas.so.13 libcublasLt.so.13 libcudart.so.13 libcurand.so.10; do
            nm -D --defined-only "$opt/lib/cuda/$lib" | awk '{sub(/@.*/, "", $3); print $3}'
        done | sort -u)
        undefined=$(comm -23 <(echo "$imported") <(echo "$defined"))
        if [ -z "$imported" ] || [ -n "$undefined" ]; then
            echo "build-image: the CUDA provider imports functions the CUDA libraries lack:" >&2
            echo "${undefined:-(no imports found)}" >&2
            exit 1
        fi
    fi
fi

# 3. The bundled model, the samples and the pipelines (relative paths in the
#    pipelines are relative to the image's working directory, /opt/audiocap).
cp -r exported_models/audiocap-sounds-small exported_models/samples exported_models/README.md \
    "$opt/exported_models/"
mkdir -p "$opt/pipelines"
cp pipelines/*.toml pipelines/README.md "$opt/pipelines/"
cp README.md "$opt/README.md"

revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
if [ "$revision" != unknown ] && ! git diff --quiet HEAD -- 2>/dev/null; then
    revision=$revision-dirty
fi
build_args=(
    --build-arg "VERSION=$version"
    --build-arg "REVISION=$revision"
    --build-arg "ONNXRUNTIME_VERSION=$ort_version"
)

# 4. The build.
if [ "$builder" = docker ]; then
    docker build -f "$containerfile" "${build_args[@]}" -t "$tag" "$context"
    echo "built $tag ($variant) with docker in $(($(date +%s) - started)) s"
    docker image ls "$tag"
    exit 0
fi

if [ "$(id -u)" != 0 ]; then
    echo "build-image: buildah with the vfs driver runs as root here (or use --docker)" >&2
    exit 1
fi
for tool in buildah mmdebstrap; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "build-image: needs $tool (apt-get install buildah mmdebstrap)" >&2
        exit 1
    fi
done
buildah=(buildah --storage-driver "${STORAGE_DRIVER:-vfs}")
export BUILDAH_ISOLATION=${BUILDAH_ISOLATION:-chroot}

# The base: Debian bookworm's minimal package set (plus ca-certificates for HTTPS
# storage), without documentation but the copyright files, merged /usr, no /dev
# nodes, as slim as debian:bookworm-slim. Built once per package list, then reused.
mirror=http://deb.debian.org/debian
base_args=(
    --variant=minbase --include=ca-certificates
    --aptopt='APT::Install-Recommends "false"'
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr --skip=output/dev
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright'
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*'
    --dpkgopt='path-exclude=/usr/share/locale/*'
    bookworm
)
base_sources=("deb $mirror bookworm main" "deb $mirror bookworm-updates main"
    "deb http://deb.debian.org/debian-security bookworm-security main")
key=$(printf '%s\n' "$arch" "${base_args[@]}" "${base_sources[@]}" | sha256sum | cut -c1-12)
base_tar=$work/base/bookworm-$key.tar
base_image=localhost/audiocap-base:bookworm-$key
(
    # One builder at a time makes and imports a base (parallel test runs share it).
    flock 9
    if [ ! -f "$base_tar" ]; then
        echo "making the base rootfs $base_tar (mmdebstrap) ..."
        if ! mmdebstrap --format=tar "${base_args[@]}" "$base_tar.partial" "${base_sources[@]}" \
            >"$work/base/mmdebstrap.log" 2>&1; then
            cat "$work/base/mmdebstrap.log" >&2
            exit 1
        fi
        mv "$base_tar.partial" "$base_tar"
    fi
    if ! "${buildah[@]}" inspect --type image "$base_image" >/dev/null 2>&1; then
        ctr=$("${buildah[@]}" from scratch)
        "${buildah[@]}" add "$ctr" "$base_tar" / >/dev/null
        "${buildah[@]}" config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
            --cmd bash --label "org.opencontainers.image.description=debian bookworm ($key)" "$ctr"
        "${buildah[@]}" commit --quiet --rm "$ctr" "$base_image" >/dev/null
    fi
) 9>"$work/base/.lock"

"${buildah[@]}" bud --quiet --isolation "$BUILDAH_ISOLATION" -f "$containerfile" \
    --build-arg "BASE=$base_image" "${build_args[@]}" -t "$tag" "$context" >/dev/null
echo "built $tag ($variant, base $base_image) in $(($(date +%s) - started)) s"
"${buildah[@]}" images "$tag"
