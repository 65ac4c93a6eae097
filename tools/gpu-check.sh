#!/usr/bin/env bash
# The connector's CUDA path on a lent GPU machine (python3 there holds a CUDA torch; see
# docs/connectors.md, "On a GPU"). Our pinned wheels for Python 3.12 travel in .whl/:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     -d .whl grpcio==1.85.1 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 \
#     protobuf==7.36.2 transformers==5.23.0 tokenizers==0.23.3 ml_dtypes==0.6.0 xxhash==4.1.0
# Then: the connector tests with the tiny models on CUDA, and `cachesvc bench reuse
# --synthetic` (random weights at real shapes) on the GPU. Results land in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
source tools/gpu-env.sh || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/gpu.txt"
if [ -z "${SKIP_TESTS:-}" ]; then
  CACHESVC_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider tests/test_hf_connector.py tests/test_profiler.py 2>&1 \
    | tee "$OUT/tests-cuda.log" | tail -15
fi
python3 -m cachesvc_bench reuse --device cuda --synthetic "${SHAPES:-smollm2-135m,llama-3.2-1b,llama-3.1-8b}" \
  --contexts "${CONTEXTS:-512,1024,2048,4096}" --prompts-per-context "${PROMPTS:-3}" \
  --json "$OUT/reuse-gpu.json" > "$OUT/reuse-gpu.log" 2>&1
rc=$?
grep -A40 '^| consumer' "$OUT/reuse-gpu.log" || tail -40 "$OUT/reuse-gpu.log"
# Issue 13: a context of any length plus a question (partial chunk, suffix, sliding-window decode).
python3 -m cachesvc_bench reuse --device cuda --unaligned "${UNALIGNED:-smollm2-135m,gemma3-270m}" \
  --contexts "${UNALIGNED_CONTEXTS:-2000,4000}" --json "$OUT/unaligned-gpu.json" > "$OUT/unaligned-gpu.log" 2>&1
rc2=$?
grep -A10 '^| model' "$OUT/unaligned-gpu.log" || tail -40 "$OUT/unaligned-gpu.log"
[ $rc -eq 0 ] && exit $rc2
exit $rc
