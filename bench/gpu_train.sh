#!/usr/bin/env bash
# samples/s and MFU of the paper model at micro-batch 98 on one GPU, text attention through SDPA
# and through flash-attn (when installed), 30 optimizer steps each on phantom shards (random-init
# BERT: no hub download). Needs deepspeed, webdataset and pydicom on the machine (carry wheels
# where nothing can be fetched).   Usage: bash bench/gpu_train.sh   (results under ${OUT:-bench/results})
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${OUT:-bench/results}
mkdir -p "$RESULTS"
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=4
$PY -c "import deepspeed, webdataset, pydicom" || { echo "gpu_train: missing packages"; exit 1; }
status=0
for impl in sdpa flash; do
  $PY launch/pretrain.py --config configs/paper_fp16.json --recipe paper --resume none \
    --run-dir "$RESULTS/paper_$impl" --max-steps 30 \
    --set model.text.pretrained=null --set data.tokenizer=auto --set data.vocab_size=28996 \
    --set data.path="$RESULTS/phantom256" --set data.phantom_studies=3600 \
    --set data.phantom_image_size=256 --set data.workers=8 --set logging.progress=false \
    --set model.text.attention_impl=$impl --set eval.zero_shot=false \
    2>&1 | tee "$RESULTS/paper_$impl.log" || status=1
done
$PY - "$RESULTS" <<'PYEOF'
import json, statistics, sys
from pathlib import Path
for impl in ("sdpa", "flash"):
    path = Path(sys.argv[1]) / f"paper_{impl}" / "metrics.jsonl"
    if not path.is_file():
        print(f"{impl}: no metrics (see the log)"); continue
    rows = [json.loads(x) for x in path.read_text().splitlines()][5:]
    print(f"paper, micro-batch 98, {impl}: {statistics.median(r['samples_per_s'] for r in rows):.1f} "
          f"samples/s, MFU {statistics.median(r.get('mfu', float('nan')) for r in rows):.3f}, "
          f"peak memory {max(r['memory_mb'] for r in rows):.0f} MiB")
PYEOF
exit $status
