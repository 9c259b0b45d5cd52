#!/usr/bin/env bash
# Everything nibble checks and measures on a lent GPU, in one call of the device tool (it runs in
# the repository root; its python3 has torch, triton and transformers, and no internet):
#     run(command="bash benchmarks/gpu_session.sh", timeout_s=600)
# 1. the CUDA tests (Triton kernels against the reference, CUDA-graph decode against transformers);
# 2. the kernel benchmark on Llama-2-7B shapes (the issue-6 targets: 2x8 and 1x16 at batch 1 against
#    fp16 cuBLAS on 11008x4096), graph-replayed, weights rotated beyond L2;
# 3. decode speed of a random model of SmolLM2-135M's shape in float16: transformers, nibble's
#    eager step and its CUDA-graph step (the built-in GGUF is too large to carry there).
# Logs go to $OUT (they come back with the call); the end of the output holds the tables.
set -uo pipefail
OUT=${OUT:-/tmp/nibble-gpu}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 - <<'EOF' | tee "$OUT/versions.txt"
import torch, triton, transformers
print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__,
      "device", torch.cuda.get_device_name())
EOF
timeout 240 python3 -m pytest -q -p no:cacheprovider -x tests/kernels/test_kernels_triton.py \
    tests/runtime/test_graphs.py 2>&1 | tee "$OUT/tests.log" | tail -5
timeout 200 python3 benchmarks/kernels.py --device cuda --shapes llama --batch 1,4,8 \
    --formats 2x8,1x16,4bit,2bit --backends triton,reference --rounds 15 2>&1 | tee "$OUT/kernels.log"
timeout 120 python3 benchmarks/decode.py --device cuda --random-weights --torch-backend --threads 1 \
    --repeats 5 --tokens 128 2>&1 | tee "$OUT/decode.log" | tail -6
