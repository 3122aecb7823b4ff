#!/usr/bin/env bash
# Longer fuzzing of every untrusted-input parser (tests/fuzz.rs): N inputs per
# target (default 200000), optionally another mutation stream.
#   scripts/fuzz.sh [iterations] [seed] [target filter, e.g. pickle]
# A finding stops its target, prints the input's number and seed, and saves the
# input under target/fuzz-findings/.
set -euo pipefail
cd "$(dirname "$0")/.."
export AUDIOCAP_FUZZ_ITERATIONS="${1:-200000}"
export AUDIOCAP_FUZZ_SEED="${2:-21}"
# A debug build: overflow checks turn arithmetic bugs into findings.
exec cargo test --test tests "fuzz::${3:-}" -- --nocapture --test-threads 2
