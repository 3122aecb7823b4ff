#!/usr/bin/env bash
# Environment: BATCHES, E2E_BATCH, REPS, CLIPS, RUN_BATCH, RUN_ROWS, ENCODER_THREAD (true|false:
# `[batching] encoder_thread` of the run; unset: its default, on with CUDA), ATTENTION (fused|eager),
# SKIP_CHECK (no tiny-model check first), SKIP_PYTORCH, NO_TRAIN (pack without the training
# bench), PROFILE (ONNX Runtime's per-node profile of one generation at the largest batch,
# summed up in profile-summary.txt), KERNEL_TRACE (GPU time per CUDA kernel, decoder at the
# largest batch and encoder, through benchmarks/kernel-trace: kernels-*.tsv), PARITY (captions
# of a tiny f16 fused model: continuous vs fixed batches, GPU vs CPU; also
# `benchmarks/gpu-throughput.sh parity` alone).
#
# Issue #8's GPU measurement: the real-size captioner (BEATs iter3+ and a Llama-3-8B-shaped
# decoder, random weights, f16 export) on ONNX Runtime's CUDA provider, the same decoder in
# PyTorch on the same GPU, and `audiocap run` end to end with fixed-length captions.
#
#   here:  benchmarks/gpu-throughput.sh pack   # .gpu/perf/bin.tar.xz + ORT GPU parts
#   there: benchmarks/gpu-throughput.sh run    # after .gpu/assemble-ort-gpu.sh is sourced
#
# `pack` takes target/release/audiocap (any release build; ONNX Runtime is loaded at run
# time), the training bench if scripts/gpu-training-check.sh built one, and the Llama 3
# tokenizer from the fixtures; ../shared/gpu/prepare-ort-gpu.sh splits ONNX Runtime's
# CUDA build into parts that travel one per device call.
#
# `run` writes into $OUT (or ./gpu-out): bench.txt (`audiocap doctor`, then the bench's
# log) + bench-real-ATTENTION.json (front end, encoder, prefill, decode at several batch sizes,
# end to end), pytorch.txt + pytorch.json (benchmarks/pytorch_captioner.py on the same
# checkpoint), run.txt (the streaming pipeline on 10 s clips, 20 tokens each, then the
# recipe's LoRA training step on the same 8B-shaped checkpoint) and smi.csv (GPU
# utilisation and memory every 200 ms; the run's window is marked in run.txt).
set -euo pipefail
cd "$(dirname "$0")/.."

pack() {
    mkdir -p .gpu/perf/stage
    grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >>.git/info/exclude
    cp target/release/audiocap .gpu/perf/stage/audiocap
    strip .gpu/perf/stage/audiocap
    cp ../shared/fixtures/e2e-tiny/llm/tokenizer.json .gpu/perf/stage/
    local bench=""
    if [ -z "${NO_TRAIN:-}" ]; then
        bench=$(ls -t target/release/deps/training-* 2>/dev/null | grep -v '\.d$' | head -1 || true)
    fi
    if [ -n "$bench" ]; then
        cp "$bench" .gpu/perf/stage/training
        strip .gpu/perf/stage/training
    fi
    # GPU time per kernel (KERNEL_TRACE=1): a CUPTI injection library, built here.
    benchmarks/kernel-trace/build.sh .gpu/perf/stage >/dev/null || echo "no kernel trace (build failed)"
    tar -C .gpu/perf/stage -cf - . | xz -3 -T2 >.gpu/perf/bin.tar.xz
    rm -rf .gpu/perf/stage
    ls .gpu/ort-part-* >/dev/null 2>&1 || ../shared/gpu/prepare-ort-gpu.sh
    ls -la .gpu/perf .gpu
}

# 10 s clips of tones and noise for the pipeline run (numpy is beside PyTorch there).
write_clips() {
    python3 - "$1" "$2" <<'PY'
import os, sys, wave
import numpy as np
out, n = sys.argv[1], int(sys.argv[2])
os.makedirs(out, exist_ok=True)
rate = 16000
t = np.arange(rate * 10) / rate
for i in range(n):
    rng = np.random.default_rng(i)
    signal = 0.3 * np.sin(2 * np.pi * (100 + 37 * i % 3000) * t) + 0.1 * rng.uniform(-1, 1, t.size)
    with wave.open(os.path.join(out, f"clip{i:05d}.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes((signal * 32767).astype("<i2").tobytes())
PY
}

# GPU utilisation during `audiocap run` (after its model load) from the nvidia-smi samples.
gpu_busy() {
    python3 - "$1" "$2" <<'PY'
import csv, datetime, re, sys
smi = sys.argv[1]
log = re.sub(r"\x1b\[[0-9;]*m", "", open(sys.argv[2]).read())  # the log's colours
def stamp(s):
    return datetime.datetime.strptime(s.strip()[:23], "%Y/%m/%d %H:%M:%S.%f")
end = stamp(re.search(r"run window end (\S+ \S+)", log).group(1))
loaded = re.search(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+)Z .*model loaded", log)
if loaded:
    start = datetime.datetime.strptime(loaded.group(1)[:26], "%Y-%m-%dT%H:%M:%S.%f")
else:
    start = stamp(re.search(r"run window start (\S+ \S+)", log).group(1))
samples = []
for row in csv.reader(open(smi)):
    try:
        t, util, mem = stamp(row[0]), int(row[1].split()[0]), int(row[2].split()[0])
    except (ValueError, IndexError):
        continue
    if start <= t <= end:
        samples.append((util, mem))
if samples:
    utils = [u for u, _ in samples]
    print(f"GPU busy during the run after the model load: mean {sum(utils) / len(utils):.0f}%, "
          f">= 90% in {100 * sum(u >= 90 for u in utils) / len(utils):.0f}% of {len(utils)} samples; "
          f"peak memory {max(m for _, m in samples)} MiB")
PY
}

# Captions of a tiny random f16 fused-attention model on the GPU: fixed batches of 16
# (`audiocap caption`) against continuous batching over 24 rows (`audiocap run`), and
# the GPU's fixed batches against the CPU's. Counts, not assertions: a random model
# has near-ties that kernel choices can flip. DEVICE=cpu runs it without a GPU.
parity() {
    local out=${OUT:-$PWD/gpu-out} bin=${BIN:-/tmp/perf} work=${WORK:-/tmp/bench} d=/tmp/parity
    local device=${DEVICE:-cuda}
    rm -rf "$d" && mkdir -p "$d" "$out"
    "$bin/audiocap" bench --preset tiny --device cpu --work-dir "$work" --tokenizer "$bin/tokenizer.json" \
        --dtype f16 --attention fused --repetitions 1 --batch-sizes 1 --quiet >/dev/null
    local model="$work/exports/bench-tiny-f16-fused-seed1"
    write_clips "$d/clips" 96
    "$bin/audiocap" caption --model "$model" --device "$device" --batch-size 16 --max-new-tokens 20 \
        --out "$d/fixed-$device.parquet" "$d/clips" >/dev/null
    "$bin/audiocap" caption --model "$model" --device cpu --batch-size 16 --max-new-tokens 20 \
        --out "$d/fixed-cpu-ref.parquet" "$d/clips" >/dev/null
    cat >"$d/run.toml" <<TOML
[model]
path = "$model"
device = "$device"
[input]
sources = ["$d/clips"]
[batching]
batch_size = 16
decoder_rows = 24
[generation]
max_new_tokens = 20
[output]
uri = "$d/continuous"
[logging]
progress = "off"
TOML
    "$bin/audiocap" run "$d/run.toml" >/dev/null 2>&1
    python3 - "$d" "$device" <<'PY' | tee -a "$out/parity.txt"
import glob, sys
import pyarrow.parquet as pq
d, device = sys.argv[1], sys.argv[2]
def load(paths):
    rows = {}
    for p in paths:
        t = pq.read_table(p, columns=["uri", "caption"]).to_pylist()
        rows.update({r["uri"].split("/")[-1]: r["caption"] for r in t})
    return rows
fixed = load([f"{d}/fixed-{device}.parquet"])
cpu = load([f"{d}/fixed-cpu-ref.parquet"])
cont = load(glob.glob(f"{d}/continuous/*.parquet"))
same = lambda a, b: sum(a[k] == b.get(k) for k in a)
print(f"parity ({device}, tiny f16 fused, {len(fixed)} clips): continuous vs fixed batches "
      f"{same(fixed, cont)}/{len(fixed)} identical; {device} vs cpu fixed batches {same(fixed, cpu)}/{len(fixed)}")
PY
}

run() {
    local out=${OUT:-$PWD/gpu-out} bin=/tmp/perf work=/tmp/bench
    mkdir -p "$out" "$bin"
    xz -dc .gpu/perf/bin.tar.xz | tar -C "$bin" -xf -
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader \
        -lms 200 >"$out/smi.csv" &
    local sampler=$!
    "$bin/audiocap" doctor >"$out/bench.txt" 2>&1 || true
    # Clips for the pipeline run, written while the GPU works on the bench.
    write_clips /tmp/clips "${CLIPS:-10240}" &
    local clips=$!

    # f16 exports default to fused attention (GroupQueryAttention); ATTENTION=eager
    # measures the plain-operator graph instead.
    local attention=${ATTENTION:-fused}
    # A minute-cheap check that the fused graph runs on this GPU before the 8B export.
    if [ "$attention" = fused ] && [ -z "${SKIP_CHECK:-}" ] && ! "$bin/audiocap" bench --preset tiny --device cuda \
        --work-dir "$work" --tokenizer "$bin/tokenizer.json" --dtype f16 --attention fused \
        --repetitions 1 2>&1 | tee -a "$out/bench.txt"; then
        echo "fused attention failed on the tiny model; eager attention" | tee -a "$out/bench.txt"
        attention=eager
    fi
    bench() {
        "$bin/audiocap" bench --preset real --device cuda --work-dir "$work" \
            --tokenizer "$bin/tokenizer.json" --batch-sizes "${BATCHES:-1,64,256}" \
            --attention "$1" ${PROFILE:+--profile "$out/profile"} \
            --encoder-batch 64 --e2e-batch "${E2E_BATCH:-128}" --repetitions "${REPS:-3}" \
            --json "$out/bench-real-$1.json" 2>&1 | tee -a "$out/bench.txt"
    }
    if ! bench "$attention"; then
        # The device time is spent either way: measure the eager graph instead.
        echo "bench with $attention attention failed; eager attention" | tee -a "$out/bench.txt"
        attention=eager
        bench eager || true
    fi

    if [ -n "${KERNEL_TRACE:-}" ] && [ -f "$bin/libkernel-trace.so" ]; then
        # Which kernels take the GPU's time: the decoder at the largest batch, then the
        # encoder, each in a process of its own traced through CUPTI (the export is
        # cached from the bench above).
        local largest
        largest=$(echo "${BATCHES:-1,64,256}" | tr ',' '\n' | sort -n | tail -1)
        for stages in decoder encoder; do
            CUDA_INJECTION64_PATH="$bin/libkernel-trace.so" KERNEL_TRACE_OUT="$out/kernels-$stages.tsv" \
                "$bin/audiocap" bench --preset real --device cuda --work-dir "$work" \
                --tokenizer "$bin/tokenizer.json" --attention "$attention" --stages "$stages" \
                --batch-sizes "$largest" --encoder-batch 64 --repetitions 1 --quiet \
                2>&1 | tee -a "$out/bench.txt" || true
            head -25 "$out/kernels-$stages.tsv" 2>/dev/null | cut -c1-150 | tee -a "$out/bench.txt" || true
        done
    fi

    if [ -d "$out/profile" ]; then
        python3 benchmarks/ort-profile-summary.py "$out"/profile/ort-profile-decoder_*.json \
            "$out"/profile/ort-profile-audio_encoder_*.json | tee "$out/profile-summary.txt" || true
        xz -T0 "$out"/profile/*.json || true
    fi

    local export
    export=$(ls -d "$work"/exports/bench-real-f16-"$attention"-seed* | grep -v '\.json$' | head -1)
    wait "$clips"
    cat >/tmp/run.toml <<TOML
[model]
path = "$export"
device = "cuda"
[input]
sources = ["/tmp/clips"]
[batching]
batch_size = ${RUN_BATCH:-64}
max_inflight_batches = 4
# Continuous batching (fused attention): rows kept busy in the decoder.
decoder_rows = ${RUN_ROWS:-256}
${ENCODER_THREAD:+encoder_thread = $ENCODER_THREAD}
[generation]
max_new_tokens = 20
min_new_tokens = 20
[output]
uri = "/tmp/run-out"
[run]
resume = false
TOML
    {
        echo "run window start $(date -u +%Y/%m/%d\ %H:%M:%S.%3N)"
        "$bin/audiocap" run /tmp/run.toml 2>&1 | tail -25
        echo "run window end $(date -u +%Y/%m/%d\ %H:%M:%S.%3N)"
    } | tee "$out/run.txt"
    gpu_busy "$out/smi.csv" "$out/run.txt" | tee -a "$out/run.txt"

    # The same decoder in PyTorch on the same GPU (last: the longest to load).
    if [ -z "${SKIP_PYTORCH:-}" ]; then
        PYTHONUNBUFFERED=1 python3 benchmarks/pytorch_captioner.py --llm "$work/sources/real-seed1/llm" \
            --batch-sizes "${BATCHES:-1,64,256}" --new-tokens 20 --repetitions 3 --peak-memory \
            --json "$out/pytorch.json" 2>&1 | tee "$out/pytorch.txt" || true
    fi

    if [ -n "${PARITY:-}" ]; then
        parity || echo "parity check failed" | tee -a "$out/parity.txt"
    fi

    if [ -x "$bin/training" ]; then
        # The recipe's LoRA step on the same 8B-shaped checkpoint (bf16 frozen weights).
        mkdir -p /tmp/train-bench
        ln -sfn "$work/sources/real-seed1/llm" /tmp/train-bench/llama3-8b
        "$bin/training" --device cuda --dtype bf16 --case llama3-8b --steps 5 --batch 8 \
            --dir /tmp/train-bench 2>&1 | tee -a "$out/run.txt" || true
    fi
    kill "$sampler" || true
}

case "${1:-}" in
pack) pack ;;
run) run ;;
parity) parity ;;
*)
    echo "usage: $0 pack|run|parity" >&2
    exit 2
    ;;
esac
