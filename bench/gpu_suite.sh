#!/usr/bin/env bash
# The GPU checks, as one prepared run (a few minutes on one H200):
#   kernel tests compiled for CUDA (no interpreter), the flash-attn / CUDA model tests, the kernel
#   benchmark and the heads benchmark on the device, and evaluation with --device cuda.
# Usage: bash bench/gpu_suite.sh     (logs and JSON under ${OUT:-bench/results})
# Uses the machine's own torch/triton (no pip install: nothing can be fetched there).
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${OUT:-bench/results}
mkdir -p "$RESULTS"
export PYTHONPATH=$PWD TRITON_INTERPRET=0 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
$PY - <<'PYEOF' || exit 1
import torch, triton
assert torch.cuda.is_available(), "no CUDA device"
print("torch", torch.__version__, "triton", triton.__version__, torch.cuda.get_device_name())
PYEOF
status=0
$PY -m pytest -q -ra -p no:cacheprovider tests/test_kernels.py tests/test_gpu_attention.py \
  2>&1 | tee "$RESULTS/gpu_tests.log" || status=1
$PY bench/kernels.py --device cuda --out "$RESULTS/kernels.json" 2>&1 \
  | tee "$RESULTS/kernels.log" || status=1
$PY bench/heads.py --device cuda --repeats 20 --out "$RESULTS/heads_cuda.json" 2>&1 \
  | tee "$RESULTS/heads_cuda.log" || status=1
# Evaluation on the GPU (--device cuda, bf16 autocast): a short tiny run, then zero-shot and a
# segmentation fine-tune on its shards, each beside its random-init baseline.
$PY launch/pretrain.py --recipe tiny --config configs/zero2.json --resume none \
  --run-dir "$RESULTS/tiny_eval" --set data.path="$RESULTS/tiny_shards" --max-steps 9 \
  > "$RESULTS/tiny_eval_train.log" 2>&1 || status=1
for task in zero-shot segmentation; do
  $PY -m prior_dist.evaluate "$task" --checkpoint "$RESULTS/tiny_eval" --device cuda \
    --fractions 1 --seeds 0 --steps 20 --out "$RESULTS/eval_cuda_$task.json" 2>&1 \
    | tee "$RESULTS/eval_cuda_$task.log" || status=1
done
echo "gpu_suite: exit $status"
exit $status
