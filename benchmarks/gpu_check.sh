#!/usr/bin/env bash
# bench.py's GPU rows in one prepared run on a lent CUDA machine: at most 8 minutes on one H100
# (BUDGET seconds in all), each part under its own time limit, the rows printed as each is
# measured (a part cut short keeps the rows before it):
#   1. the CUDA-only tests: graph replay against the eager static step, the engine against the
#      teaching core, FlexAttention forwards and backwards                        (<= 90 s)
#   2. bench.py: the machine's limits; the paper section (Qwen2.5-3B's shape: decode at batch 64
#      and 256, transformers' generate against --engine static; the packed update, actor alone,
#      actor + critic where memory_plan says it fits, LoRA; one step of --advantage reinforce_pp
#      --kl_coef 0 and one of --preset paper_lora); the host's bookkeeping per decode step; the
#      generation rows at SmolLM2 batch 64 (transformers, --engine dynamic, static, plain)
#                                                                                 (the rest - 60 s)
#   3. --engine static --compile_decode against transformers at SmolLM2 batch 64, only if at
#      least 45 s are left (Inductor compiles each static shape: it may not fit)
# Left out to fit: the update, step, fsdp and grpo sections (python bench.py runs them all).
# Run from the repository root; the tables go to $OUT (default /tmp/medrlvr_gpu).
set -u
OUT=${OUT:-/tmp/medrlvr_gpu}
BUDGET=${BUDGET:-480}
mkdir -p "$OUT"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1  # the lent machines have no network
left() { echo $((BUDGET - SECONDS)); }
within() { local s=$(($(left) - $1)); echo $((s > 1 ? s : 1)); }  # what is left, less $1 seconds

timeout 90 python -m pytest -q -rs tests/test_static_decode.py tests/test_engine.py \
    tests/test_flex.py -k cuda 2>&1 | tail -15 | tee "$OUT/tests.txt"
timeout "$(within 60)" python bench.py --only machine,paper,host,generation \
    --workloads smollm2-b64 --gen_repeats 1 --out "$OUT/gpu.md" 2>&1 | tee "$OUT/bench.txt" \
    | grep "^| "
if [ "$(left)" -ge 45 ]; then
    timeout "$(within 5)" python bench.py --only generation --workloads smollm2-b64 \
        --gen_repeats 1 --generators transformers static-compiled --out "" 2>&1 \
        | tee "$OUT/compiled.txt" | grep "^| generation"
else
    echo "| generation | --engine static --compile_decode | not run: $(left) s of the budget left |"
fi
echo "gpu_check: ${SECONDS} s of ${BUDGET}"
