#!/usr/bin/env bash
# Bytes per row of the captions table with and without the `tags` and `embedding`
# columns (issue 25), measured on Parquet files that `audiocap caption` writes.
#
# The fixture tagger (../shared/fixtures/beats-tiny-tagger: 48-d encoder, 7 labels)
# with the tiny decoder (64-d projector space) captions 400 synthetic clips (noise,
# tones, chirps, 1-3 s) once per option; pyarrow reads each file's footer and sums
# the compressed size of every column chunk per column (pyarrow and DuckDB read each
# file back whole first). The output gives bytes per
# row for each column and bytes per embedding value, the figure that scales to
# BEATs-base (768 values) and an 8B decoder (4096).
#
# Usage: benchmarks/row-bytes.sh [AUDIOCAP_BINARY]   (default target/release/audiocap,
# else target/debug/audiocap; file sizes do not depend on the build)
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release/audiocap}
[ -x "$bin" ] || bin=target/debug/audiocap
fixtures=../shared/fixtures
work=${TMPDIR:-/tmp}/audiocap-row-bytes
rm -rf "$work"
mkdir -p "$work/audio"
trap 'rm -rf "$work"' EXIT

"$bin" export --beats "$fixtures/beats-tiny-tagger/beats.pt" \
    --tag-labels "$fixtures/beats-tiny-tagger/class_labels_indices.csv" \
    --llm "$fixtures/e2e-tiny/llm" --projector "$fixtures/e2e-tiny/projector.safetensors" \
    --name tiny-tagger --out "$work/model" 2>/dev/null

python3 - "$work/audio" <<'EOF'
import math, random, struct, sys, wave
random.seed(25)
for i in range(400):
    n = int(16000 * random.uniform(1.0, 3.0))
    kind = i % 3
    f0, f1, amp = random.uniform(100, 4000), random.uniform(100, 4000), random.uniform(0.05, 0.8)
    samples = []
    for t in range(n):
        if kind == 0:
            v = random.gauss(0, amp / 3)
        elif kind == 1:
            v = amp * math.sin(2 * math.pi * f0 * t / 16000)
        else:
            f = f0 + (f1 - f0) * t / n
            v = amp * math.sin(2 * math.pi * f * t / 16000)
        samples.append(max(-32767, min(32767, int(v * 32767))))
    with wave.open(f"{sys.argv[1]}/clip_{i:03}.wav", "wb") as w:
        w.setnchannels(1); w.setsampwidth(2); w.setframerate(16000)
        w.writeframes(struct.pack(f"<{n}h", *samples))
EOF

run() {
    local name=$1; shift
    "$bin" caption --model "$work/model" --max-new-tokens 8 --batch-size 16 "$@" \
        --out "$work/$name.parquet" "$work/audio" >/dev/null 2>&1
}
run none --tags 0
run tags5 --tags 5
run encoder-f32 --tags 0 --embedding encoder
run encoder-f16 --tags 0 --embedding encoder --embedding-dtype f16
run projector-f32 --tags 0 --embedding projector
run projector-f16 --tags 0 --embedding projector --embedding-dtype f16

python3 - "$work" <<'EOF'
import os, sys
import duckdb
import pyarrow.parquet as pq
work = sys.argv[1]
def sizes(name):
    path = f"{work}/{name}.parquet"
    # Both readers read every column back.
    assert pq.read_table(path).num_rows == duckdb.sql(f"select count(*) from read_parquet('{path}')").fetchall()[0][0]
    meta = pq.ParquetFile(path).metadata
    by_column = {}
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        for c in range(rg.num_columns):
            col = rg.column(c)
            top = col.path_in_schema.split(".")[0]
            by_column[top] = by_column.get(top, 0) + col.total_compressed_size
    return meta.num_rows, by_column, os.path.getsize(f"{work}/{name}.parquet")
rows, base, base_file = sizes("none")
print(f"rows: {rows}; file without tags or embedding: {base_file} bytes ({base_file / rows:.1f} per row)")
for name, column, dim in [
    ("tags5", "tags", None),
    ("encoder-f32", "embedding", 48),
    ("encoder-f16", "embedding", 48),
    ("projector-f32", "embedding", 64),
    ("projector-f16", "embedding", 64),
]:
    n, cols, file = sizes(name)
    assert n == rows, (name, n, rows)
    per_row = cols[column] / rows
    line = f"{name}: column {column} {cols[column]} bytes, {per_row:.1f} per row"
    if dim:
        line += f", {per_row / dim:.3f} per value ({dim} values)"
    line += f"; whole file +{(file - base_file) / rows:.1f} bytes per row"
    print(line)
EOF
