#!/usr/bin/env bash
# Checks the README's two commands from a clean state, as a new user would run them.
#
# What a fresh Debian 12 machine is assumed to have (the README's "Before you start"
# says the same): everything else must come from the README's commands or .ci/run.
#
#   cargo, rustc    a stable Rust toolchain (rustup; edition 2024, built with 1.95)
#   cc              a C compiler for the crates that build C (Debian: gcc)
#   python3         Python 3.10 or later with pip and venv (Debian: python3,
#                   python3-pip, python3-venv)
#   git             to clone the repository
#   apt-get, dpkg-deb, dpkg
#                   Debian's package tools with package lists that reach the archive:
#                   the corpus builder downloads its pinned packages with
#                   `apt-get download` and unpacks them with `dpkg -x`
#   ldd             the C library's loader tools (Debian: libc-bin, always there)
#   java            for METEOR (Java 8 or later; .ci/run installs
#                   default-jre-headless where it is missing)
#   node, npm       for the Azure tests, which install Azurite with npm (Node.js 18
#                   or later; .ci/run installs nodejs npm where they are missing)
#   buildah, mmdebstrap
#                   for the image test, run as root (tests/container_image.rs;
#                   .ci/run installs them where they are missing); it also uses
#                   strip and nm (binutils, which gcc brings) and flock (util-linux)
#
# The check: clone the committed HEAD into a new folder with ../shared beside it,
# give it an empty HOME (no ONNX Runtime, corpus or pip cache from earlier runs), a
# Python virtual environment without the machine's site-packages (no PyPI package
# the README does not install) and a target folder of its own, then run the README's
# two commands verbatim, read out of README.md. Java and Node.js are taken as found.
#
# Usage: scripts/fresh-machine-check.sh [--keep] [--target DIR]
#   --keep        keep the scratch folder (printed at the end)
#   --target DIR  reuse DIR as the clone's cargo target folder (skips building the
#                 dependencies again, ~30 min on 2 cores; everything else stays
#                 fresh). Give it a copy (`cp -a target /tmp/check-target`), never a
#                 checkout's own target/: the clone's builds replace the binaries
#                 there, and that checkout's next `cargo test` may run them
# Exit 0 when both commands pass; 1 when one fails; 2 when an assumed tool is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)

keep=0
target=""
while [ $# -gt 0 ]; do
    case "$1" in
        --keep) keep=1 ;;
        --target)
            target=${2:?--target needs a folder}
            shift
            ;;
        -h | --help)
            sed -n '2,39p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "fresh-machine-check: unknown argument '$1'" >&2
            exit 2
            ;;
    esac
    shift
done

# 1. What is assumed to be there.
missing=()
for tool in cargo rustc cc python3 git apt-get dpkg dpkg-deb ldd java node npm buildah mmdebstrap \
    strip nm flock; do
    if command -v "$tool" >/dev/null 2>&1; then
        printf '  %-9s %s\n' "$tool" "$(command -v "$tool")"
    else
        missing+=("$tool")
    fi
done
if ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    missing+=("python3 venv/ensurepip (Debian: python3-venv)")
fi
if [ ${#missing[@]} -gt 0 ]; then
    echo "fresh-machine-check: not on this machine, and assumed preinstalled:" >&2
    printf '  - %s\n' "${missing[@]}" >&2
    exit 2
fi
if [ ! -f ../shared/fixtures/README.md ]; then
    echo "fresh-machine-check: ../shared/fixtures is needed beside the repository" >&2
    exit 2
fi

# 2. The README's two commands, verbatim: the first command line after "# 1." and
#    after "# 2." in its first sh block.
readme_command() {
    awk -v n="$1" '
        /^```sh/ && !seen { inside = 1; seen = 1; next }
        inside && /^```/ { exit }
        inside && $0 ~ "^# " n "\\." { want = 1; next }
        inside && want && !/^#/ && NF { print; exit }
    ' README.md
}
main_job=$(readme_command 1)
tests=$(readme_command 2)
if [ -z "$main_job" ] || [ -z "$tests" ]; then
    echo "fresh-machine-check: README.md has no '# 1.' / '# 2.' commands in its first sh block" >&2
    exit 1
fi
if ! grep -qxF "$tests" .ci/run; then
    echo "fresh-machine-check: .ci/run does not run the README's test command verbatim:" >&2
    echo "  $tests" >&2
    exit 1
fi

# 3. A clean state.
scratch=$(mktemp -d "${TMPDIR:-/tmp}/audiocap-fresh.XXXXXX")
cleanup() {
    if [ "$keep" = 1 ]; then
        echo "scratch folder kept: $scratch"
    else
        rm -rf "$scratch"
    fi
}
trap cleanup EXIT
git clone --quiet "$repo" "$scratch/audiocap"
ln -s "$(cd ../shared && pwd)" "$scratch/shared"
mkdir -p "$scratch/home"
python3 -m venv "$scratch/venv"
# The Rust toolchain stays where rustup put it; everything else is new.
export CARGO_HOME=${CARGO_HOME:-$HOME/.cargo}
export RUSTUP_HOME=${RUSTUP_HOME:-$HOME/.rustup}
export HOME="$scratch/home"
unset AUDIOCAP_HOME ORT_DYLIB_PATH VIRTUAL_ENV PYTHONPATH
export PATH="$scratch/venv/bin:$PATH"
if [ -n "$target" ]; then
    export CARGO_TARGET_DIR=$target
else
    export CARGO_TARGET_DIR="$scratch/audiocap/target"
fi
cd "$scratch/audiocap"

status=0
run_step() {
    local name=$1 command=$2 started
    started=$(date +%s)
    echo "== $name: $command"
    if bash -euo pipefail -c "$command"; then
        echo "== $name: passed in $(($(date +%s) - started)) s"
    else
        echo "== $name: FAILED after $(($(date +%s) - started)) s" >&2
        status=1
    fi
}
run_step "main job" "$main_job"
run_step "tests" "$tests"
exit $status
