#!/usr/bin/env bash
# What the container images and the real Airflow run cost (issue #22): the figures in
# README.md "Images" and benchmarks/RESULTS.md come from this script's output,
# committed as benchmarks/ci-costs.txt. Run as root on the development machine:
#
#   benchmarks/ci-costs.sh 2>&1 | tee benchmarks/ci-costs.txt
#
# 1. the CPU image as the CI test builds it (the debug binary), from nothing: no base
#    rootfs, no wheels under target/image/ (pip's own cache is what the machine has);
# 2. the same again, with target/image/ and the base image kept (a repeated test run);
# 3. the demo pipeline inside it; 4. the CPU image with the release binary (the real
#    image's size); 5. the CUDA image with the release binary; 6. the CI test itself;
# 7. the pinned Airflow installed without pip's cache (a fresh machine) and the DAG test.
# Needs target/debug/audiocap and target/release/audiocap built beforehand.
set -euo pipefail
cd "$(dirname "$0")/.."
b=(buildah --storage-driver "${STORAGE_DRIVER:-vfs}")
stamp() { date +%s.%N; }
took() { awk -v a="$1" -v b="$(stamp)" 'BEGIN { printf "%.1f s", b - a }'; }
size() { "${b[@]}" images --format '{{.Size}}' "$1"; }

echo "== $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(buildah --version)"
for t in localhost/audiocap-measure:debug localhost/audiocap-measure:release \
    localhost/audiocap-measure:cuda; do
    "${b[@]}" rmi "$t" >/dev/null 2>&1 || true
done

echo "== 1. CPU image, debug binary, nothing cached under target/image/"
mv target/image "target/image.measure-$$" 2>/dev/null || true
"${b[@]}" images --format '{{.Name}}:{{.Tag}}' | grep '^localhost/audiocap-base:' |
    xargs -r "${b[@]}" rmi >/dev/null 2>&1 || true
t=$(stamp)
scripts/build-image.sh --cpu --binary target/debug/audiocap --tag localhost/audiocap-measure:debug | tail -n 1
echo "build: $(took "$t"), image $(size localhost/audiocap-measure:debug)"
ls -l target/image/base/*.tar | awk '{print "base rootfs tarball:", $5, "bytes"}'
# Keep the fresh downloads; drop what was moved aside.
rm -rf "target/image.measure-$$"

echo "== 2. the same, base and wheels cached"
t=$(stamp)
scripts/build-image.sh --cpu --binary target/debug/audiocap --tag localhost/audiocap-measure:debug | tail -n 1
echo "build: $(took "$t")"

echo "== 3. audiocap doctor and the demo pipeline in the image"
ctr=$("${b[@]}" from localhost/audiocap-measure:debug)
t=$(stamp)
"${b[@]}" run --isolation chroot "$ctr" -- audiocap doctor | sed -n '2,4p'
echo "doctor: $(took "$t")"
t=$(stamp)
"${b[@]}" run --isolation chroot "$ctr" -- audiocap run pipelines/demo.toml 2>/dev/null | sed -n '1,3p'
echo "demo: $(took "$t")"
"${b[@]}" rm "$ctr" >/dev/null

echo "== 4. CPU image, release binary"
t=$(stamp)
scripts/build-image.sh --cpu --binary target/release/audiocap --tag localhost/audiocap-measure:release | tail -n 1
echo "build: $(took "$t"), image $(size localhost/audiocap-measure:release)"

echo "== 5. CUDA image, release binary (wheels as cached before this run)"
t=$(stamp)
scripts/build-image.sh --gpu --binary target/release/audiocap --tag localhost/audiocap-measure:cuda | tail -n 1
echo "build: $(took "$t"), image $(size localhost/audiocap-measure:cuda)"
ls -l target/image/wheels/*.whl | awk '{s += $5} END {printf "wheels downloaded: %.2f GB\n", s / 1e9}'

for t in localhost/audiocap-measure:debug localhost/audiocap-measure:release \
    localhost/audiocap-measure:cuda; do
    "${b[@]}" rmi "$t" >/dev/null 2>&1 || true
done

echo "== 6. the CI test (cargo test --test tests container_image; the test binary built)"
t=$(stamp)
cargo test --quiet --test tests container_image 2>&1 | grep -E '^test result'
echo "test: $(took "$t")"

echo "== 7. Airflow: the pinned install without pip's cache, then the DAG test"
venv=target/tmp/airflow-measure
rm -rf "$venv"
t=$(stamp)
AIRFLOW_VENV=$venv PIP_NO_CACHE_DIR=1 scripts/airflow-venv.sh >/dev/null
echo "install: $(took "$t"), $(du -sh "$venv" | cut -f1)"
t=$(stamp)
AUDIOCAP_AIRFLOW=$(realpath "$venv/bin/airflow") cargo test --quiet --test tests \
    deploy_recipes::airflow_runs_the_dag_end_to_end 2>&1 | grep -E '^test result'
echo "test: $(took "$t")"
rm -rf "$venv" "$venv.lock"
