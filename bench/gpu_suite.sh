#!/usr/bin/env bash
# Every GPU check in one prepared run (about 6-8 minutes on one H200), each step under its own
# time limit and all of them under one overall deadline, packing its results after every step so
# that a run cut short still returns what it measured:
#   1. the Triton kernel tests compiled for CUDA (fp32/bf16/fp16, forward and backward against
#      the float64 reference), the flash-attn / CUDA model tests and the mixed-precision norms;
#   2. the paper recipe on 2000 phantom studies stored at the training size (224 px square: the
#      loader only decodes, the step rotates), micro-batch 98, random BERT init, stages of
#      10/10/20 steps, in bf16 and in fp16: samples/s, MFU, peak memory, data wait,
#      and a torch.profiler window over two stage-3 steps (RUN_DIR/profile: ops.txt, trace.json);
#   3. visualize attention, evaluate zero-shot, linear-probe and segmentation with --device cuda
#      on the bf16 run;
#   4. bench/heads.py --device cuda and bench/kernels.py (Triton vs eager vs torch.compile).
# Usage: bash bench/gpu_suite.sh
#   Results: ${OUT:-bench/results}/suite.log, results.tgz (logs, JSON, metrics) and summary.json.
#   GPU_SUITE_DEADLINE_S (default 500): seconds for everything; steps that no longer fit are
#   skipped. GPU_SUITE_SMOKE=1: tiny sizes on the CPU, to check this script where no GPU is.
# Uses the machine's own torch/triton. Packages the machine lacks (deepspeed and its pydantic,
# hjson; webdataset, braceexpand, pydicom) are installed from wheels in .whl/ when it exists
# (see docs/gpu.md for how to gather them).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${OUT:-bench/results}
WORK=${GPU_SUITE_WORK:-/tmp/prior_gpu_suite}
DEADLINE=${GPU_SUITE_DEADLINE_S:-500}
SMOKE=${GPU_SUITE_SMOKE:-0}
mkdir -p "$OUT_DIR" "$WORK"
exec > >(tee -a "$OUT_DIR/suite.log") 2>&1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/prior_site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/prior_site
fi

if [ "$SMOKE" = 1 ]; then
  export TRITON_INTERPRET=1 OMP_NUM_THREADS=2
  DEVICE=cpu STUDIES=120 WORKERS=2 STEPS=(2 2 2) HEADS_BATCH=4 REPEATS=2 EVAL_STEPS=2
  KERNEL_ARGS=(--smoke) PRECISIONS=(fp32)
  printf '{"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 2}}' \
    > "$WORK/ds_fp32.json"
  MICRO=(--set deepspeed_expect.train_micro_batch_size_per_gpu=4)
else
  export TRITON_INTERPRET=0 OMP_NUM_THREADS=4
  DEVICE=cuda STUDIES=2000 WORKERS=12 STEPS=(10 10 20) HEADS_BATCH=98 REPEATS=20 EVAL_STEPS=20
  KERNEL_ARGS=(--device cuda --repeats 20) PRECISIONS=(bf16 fp16) MICRO=()
fi
config_for() { [ "$1" = fp32 ] && echo "$WORK/ds_fp32.json" || echo "configs/paper_$1.json"; }
MAX_STEPS=$((STEPS[0] + STEPS[1] + STEPS[2]))
STAGES="[{steps: ${STEPS[0]}, warmup_steps: 2}, {steps: ${STEPS[1]}, warmup_steps: 2},"
STAGES+=" {steps: ${STEPS[2]}, warmup_steps: 2, lr: 5.0e-6}]"

pack() {  # everything small under $WORK (no checkpoints, shards or tokenizers) into $OUT
  tar czf "$OUT_DIR/results.tgz.part" -C "$WORK" --exclude=checkpoints --exclude=tokenizer \
    --exclude='phantom*' . 2>/dev/null && mv "$OUT_DIR/results.tgz.part" "$OUT_DIR/results.tgz"
}
status=0
last_rc=0
step() {  # step NAME LIMIT_S CMD...: run under min(LIMIT_S, time left), log to $WORK/NAME.log
  local name=$1 limit=$2 left=$((DEADLINE - SECONDS))
  shift 2
  if [ "$left" -lt 30 ]; then
    echo "== $name: skipped, ${left}s left of ${DEADLINE}s"
    echo "{\"step\": \"$name\", \"skipped\": true}" >> "$WORK/steps.jsonl"
    status=1
    last_rc=124
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  local start=$SECONDS
  echo "== $name (limit ${limit}s, at ${SECONDS}s)"
  timeout -k 15 "$limit" "$@" > "$WORK/$name.log" 2>&1
  local rc=$?
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - start))}" >> "$WORK/steps.jsonl"
  tail -n 6 "$WORK/$name.log" | cut -c1-300
  echo "== $name: exit $rc in $((SECONDS - start))s"
  [ "$rc" = 0 ] || status=1
  last_rc=$rc
  pack
}

step env 60 $PY - "$DEVICE" <<'PYEOF'
import platform, subprocess, sys
import torch
print("python", platform.python_version(), "torch", torch.__version__)
for name in ("triton", "deepspeed", "transformers", "webdataset", "pydicom", "flash_attn"):
    try:
        module = __import__(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as error:  # a missing optional package is reported, not fatal
        print(name, "missing:", type(error).__name__, error)
if sys.argv[1] == "cuda":
    assert torch.cuda.is_available(), "no CUDA device"
    print(torch.cuda.get_device_name(), torch.version.cuda, torch.cuda.get_device_capability())
    print(subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout)
PYEOF
[ "$status" = 0 ] || { echo "gpu_suite: the environment check failed"; exit 1; }

step gpu_tests 150 $PY -m pytest -q -ra -p no:cacheprovider tests/test_kernels.py \
  tests/test_gpu_attention.py tests/test_batchnorm.py
step phantom 90 $PY -m prior_dist.shardify phantom --num "$STUDIES" --out "$WORK/phantom224" \
  --image-size 224 --resize square --workers "$WORKERS" --no-progress
for precision in "${PRECISIONS[@]}"; do
  step "paper_$precision" 170 $PY launch/pretrain.py --config "$(config_for "$precision")" \
    --recipe paper --resume none --run-dir "$WORK/paper_$precision" --max-steps "$MAX_STEPS" \
    --set model.text.pretrained=null --set data.tokenizer=auto --set data.vocab_size=28996 \
    --set data.path="$WORK/phantom224" --set data.workers="$WORKERS" \
    --set logging.progress=false --set eval.zero_shot=false --set "train.stages=$STAGES" \
    --set "logging.profile_steps=[$((MAX_STEPS - 2)), $((MAX_STEPS - 1))]" "${MICRO[@]}"
  if [ "$precision" = "${PRECISIONS[0]}" ] && [ "$last_rc" = 0 ]; then  # evaluation, first run
    step visualize 60 $PY -m prior_dist.visualize attention --checkpoint \
      "$WORK/paper_$precision" --device "$DEVICE" --out "$WORK/figures"
    for task in zero-shot linear-probe segmentation; do
      step "eval_$task" 90 $PY -m prior_dist.evaluate "$task" --checkpoint "$WORK/paper_$precision" \
        --device "$DEVICE" --fractions 1 --seeds 0 --steps "$EVAL_STEPS" \
        --out "$WORK/eval_$task.json"
    done
  fi
done
step heads 90 $PY bench/heads.py --device "$DEVICE" --batch "$HEADS_BATCH" \
  --repeats "$REPEATS" --out "$WORK/heads.json"
# Last: it writes its JSON after every case, so a cut keeps the cases measured.
step kernels 150 $PY bench/kernels.py "${KERNEL_ARGS[@]}" --out "$WORK/kernels.json"
$PY bench/gpu_summary.py "$WORK" --out "$OUT_DIR/summary.json" || status=1
pack
echo "gpu_suite: exit $status after ${SECONDS}s"
exit $status
