#!/usr/bin/env bash
# The connector's CUDA path on a lent GPU machine (python3 there holds a CUDA torch; see
# docs/connectors.md, "On a GPU"). Our pinned wheels for Python 3.12 travel in .whl/:
# `make gpu-wheels` here, then run `bash tools/gpu-check.sh` there with ".whl" carried.
# tests/test_gpu_script.py parses every benchmark command below on the CPU, so a renamed
# flag fails CI rather than a GPU lease.
# Then: the connector tests with the tiny models on CUDA (the direct path from the arena
# registered with CUDA among them), the reuse path's fixed cost (`bench overhead`), and
# `cachesvc bench reuse --synthetic` (random weights at real shapes, to 16384 tokens for
# the 8B shape) on the GPU, and the agents' copy workload at the 8B shape. Results land in
# $OUT. Fits ~10 minutes of an H100/H200 (SKIP_TESTS=1 for the benchmarks alone).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
source tools/gpu-env.sh || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
if [ -z "${SKIP_TESTS:-}" ]; then
  CACHESVC_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider tests/test_hf_connector.py tests/test_direct.py \
    tests/test_profiler.py 2>&1 \
    | tee "$OUT/tests-cuda.log" | tail -15
fi
# Issue 12: the fixed cost (direct and data-plane fetch), then TTFT and load against the
# pinned host-to-device ceiling.
python3 -m cachesvc_bench overhead --device cuda --contexts 512,2048 --json "$OUT/overhead-gpu.json" \
  > "$OUT/overhead-gpu.log" 2>&1
grep -A10 '^| mode' "$OUT/overhead-gpu.log" || tail -20 "$OUT/overhead-gpu.log"
python3 -m cachesvc_bench reuse --device cuda --synthetic "${SHAPES:-smollm2-135m,llama-3.2-1b}" \
  --contexts "${CONTEXTS:-1024,4096}" --prompts-per-context "${PROMPTS:-3}" \
  --json "$OUT/reuse-gpu.json" > "$OUT/reuse-gpu.log" 2>&1
rc=$?
grep -A40 '^| consumer' "$OUT/reuse-gpu.log" || tail -40 "$OUT/reuse-gpu.log"
python3 -m cachesvc_bench reuse --device cuda --synthetic llama-3.1-8b \
  --contexts "${LONG_CONTEXTS:-4096,16384}" --prompts-per-context "${LONG_PROMPTS:-2}" \
  --json "$OUT/reuse-gpu-8b.json" > "$OUT/reuse-gpu-8b.log" 2>&1
[ $? -eq 0 ] || rc=1
grep -A20 '^| consumer' "$OUT/reuse-gpu-8b.log" || tail -40 "$OUT/reuse-gpu-8b.log"
# Issue 13: a context of any length plus a question (partial chunk, suffix, sliding-window decode).
python3 -m cachesvc_bench reuse --device cuda --unaligned "${UNALIGNED:-smollm2-135m,gemma3-270m}" \
  --contexts "${UNALIGNED_CONTEXTS:-2000,4000}" --json "$OUT/unaligned-gpu.json" > "$OUT/unaligned-gpu.log" 2>&1
rc2=$?
grep -A10 '^| model' "$OUT/unaligned-gpu.log" || tail -40 "$OUT/unaligned-gpu.log"
# Issue 16: the copy workload at the 8B shape (random weights: TTFT and fidelity to dense
# only), 5 agents, as the paper's TTFT setting; and the agent tests on CUDA.
if [ -z "${SKIP_TESTS:-}" ]; then
  CACHESVC_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider tests/test_agents.py 2>&1 \
    | tee "$OUT/tests-agents-cuda.log" | tail -5
fi
python3 -m cachesvc_bench agents --device cuda --model "${AGENT_MODEL:-llama-3.1-8b}" --workload copy \
  --modes dense,prefix_only,nearest,reuse_all,blend --agent-rounds "${AGENT_ROUNDS:-2}" --calibration-rounds 1 \
  --slab-dtype bfloat16 \
  --json "$OUT/agents-gpu.json" > "$OUT/agents-gpu.log" 2>&1 || rc=1
grep -A12 '^| workload' "$OUT/agents-gpu.log" || tail -40 "$OUT/agents-gpu.log"
[ $rc -eq 0 ] && exit $rc2
exit $rc
