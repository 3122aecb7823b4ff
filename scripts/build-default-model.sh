#!/usr/bin/env bash
# Rebuilds the bundled default model from nothing but Debian packages, on the CPU:
#
#   1. the corpus (corpus/: pinned sound packages, espeak-ng speech, synthetic
#      signals, mixtures; fixed test split)                      ~1 min
#   2. the encoder: a BEATs-architecture tagger on the corpus labels
#      (pipelines/pretrain-encoder-default.toml)                 ~30 min on 2 cores
#   3. the decoder: a small Llama-architecture language model with its own BPE
#      tokenizer on the corpus captions
#      (pipelines/pretrain-decoder-default.toml)                 ~20 min
#   4. the captioner: projector + LoRA, then two more LoRA runs merged by `cat`
#      (pipelines/train-default-model.toml)                      ~50 min
#   5. the ONNX export into exported_models/$NAME
#   6. captions of the fixed test split and their DCASE metrics
#
# Every step writes under target/bundled/ (the paths pipelines/train-default-model.toml
# names); a step whose output exists is skipped, so the script resumes after an
# interruption (remove a step's folder to redo it).
set -euo pipefail
cd "$(dirname "$0")/.."

NAME=${NAME:-audiocap-sounds-small}
WORK=target/bundled
BIN=target/release/audiocap

cargo build --release
mkdir -p "$WORK"

if [ ! -f "$WORK/corpus/corpus.json" ]; then
  "$BIN" corpus build --out "$WORK/corpus" --overwrite
fi

if [ ! -f "$WORK/encoder/encoder.safetensors" ]; then
  "$BIN" pretrain encoder --settings pipelines/pretrain-encoder-default.toml \
    --manifest "$WORK/corpus/train.csv" --audio "$WORK/corpus/audio/train" \
    --validation "$WORK/corpus/validation.csv" --validation-audio "$WORK/corpus/audio/validation" \
    --out "$WORK/encoder"
fi

if [ ! -f "$WORK/decoder/model.safetensors" ]; then
  "$BIN" pretrain decoder --settings pipelines/pretrain-decoder-default.toml \
    --captions "$WORK/corpus/train.csv" --validation "$WORK/corpus/validation.csv" \
    --out "$WORK/decoder"
fi

if [ ! -f "$WORK/captioner/final/projector.safetensors" ]; then
  # --resume continues an interrupted run from its last checkpoint.
  resume=()
  [ -d "$WORK/captioner" ] && resume=(--resume)
  "$BIN" train pipelines/train-default-model.toml "${resume[@]}"
fi

"$BIN" export --beats "$WORK/encoder/encoder.safetensors" --llm "$WORK/decoder" \
  --projector "$WORK/captioner/final/projector.safetensors" \
  --adapter "$WORK/captioner/final/adapter" \
  --name "$NAME" --out "exported_models/$NAME" --overwrite

# Provenance beside model.json (which already names every source file by hash): the
# corpus version and its packages, the recipe files, and what pre-training reported.
python3 - "$WORK" "exported_models/$NAME/training.json" <<'PY'
import hashlib, json, sys
work, out = sys.argv[1], sys.argv[2]
def sha(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()
corpus = json.load(open(f"{work}/corpus/corpus.json"))
recipe = ["pipelines/pretrain-encoder-default.toml", "pipelines/pretrain-decoder-default.toml",
          "pipelines/train-default-model.toml", "corpus/corpus.toml", "corpus/test-split.txt"]
json.dump({
    "corpus": {k: corpus[k] for k in ("name", "version", "seed", "clips", "recordings", "hours")}
              | {"packages": [{k: p[k] for k in ("name", "version", "sha256", "licence")}
                              for p in corpus["packages"]],
                 "manifests": {s: sha(f"{work}/corpus/{s}.csv")
                               for s in ("train", "validation", "test")}},
    "recipe": {f: sha(f) for f in recipe},
    "encoder_pretraining": json.load(open(f"{work}/encoder/pretrain.json")),
    "decoder_pretraining": json.load(open(f"{work}/decoder/pretrain.json")),
    "captioner": [json.loads(line) for line in open(f"{work}/captioner/metrics.jsonl")
                  if json.loads(line).get("kind") != "train"],
}, open(out, "w"), indent=2)
PY

# Exit code 3: some clips failed (each is an error row, e.g. too short for one
# encoder patch); the metrics skip them.
status=0
"$BIN" caption --model "exported_models/$NAME" --out "$WORK/test-captions.parquet" \
  "$WORK/corpus/audio/test" || status=$?
[ "$status" -eq 0 ] || [ "$status" -eq 3 ] || exit "$status"
# The model card's figures: the DCASE metrics, the best constant caption among the
# training captions, and how often a caption names its clip's sound.
"$BIN" eval --pred "$WORK/test-captions.parquet" --refs "$WORK/corpus/test.csv" \
  --constant-baseline "$WORK/corpus/train.csv" --labels-column labels \
  --out "$WORK/test-metrics.json"
