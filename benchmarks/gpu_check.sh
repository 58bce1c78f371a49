#!/usr/bin/env bash
# The GPU figures of bench.py in one prepared run on a lent CUDA machine (about 8 minutes on an
# H200): first the CUDA-only tests (CUDA-graph replay against the eager static step, the engine
# against the teaching core, FlexAttention forwards and backwards), then the generation rows at
# SmolLM2 batch 64 (transformers eager, its static-cache compiled path, the engine with CUDA graphs
# and without) and the paper section (Qwen2.5-3B's shape: decode, update MFU, one paper step).
# Run from the repository root; the table goes to $OUT/gpu.md (default /tmp/medrlvr_gpu).
set -u
OUT=${OUT:-/tmp/medrlvr_gpu}
mkdir -p "$OUT"
export TOKENIZERS_PARALLELISM=false
python -m pytest -q -rs tests/test_static_decode.py tests/test_engine.py tests/test_flex.py \
    -k "cuda" 2>&1 | tail -15 | tee "$OUT/tests.txt"
python bench.py --only generation,paper --workloads smollm2-b64 --gen_repeats 1 \
    --out "$OUT/gpu.md" 2>&1 | tee "$OUT/bench.txt" | grep "^| "
