#!/bin/bash
# Submit a shardify array of N tasks and a finalize job that runs when all of them succeed.
#   launch/slurm/shardify_submit.sh N OUT_DIR SUB-COMMAND [OPTIONS...]   (without --out)
# e.g. launch/slurm/shardify_submit.sh 8 shards/mimic mimic-cxr --images ... --reports ... --metadata ...
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 NUM_TASKS OUT_DIR SUB-COMMAND [OPTIONS...]" >&2
  exit 2
fi
tasks=$1 out=$2
shift 2
here=$(cd "$(dirname "$0")" && pwd)
PYTHON=${PYTHON:-python}
# Each argument shell-quoted (printf %q), so paths with spaces or shell characters arrive as
# they were given and are never run by a shell.
printf -v SHARDIFY_ARGS '%q ' "$@" --out "$out"
export PYTHON SHARDIFY_ARGS
array=$(sbatch --parsable --array=0-$((tasks - 1)) "$here/shardify.sbatch")
printf -v finalize '%q ' "$PYTHON" -m prior_dist.shardify finalize "$out"
final=$(sbatch --parsable --dependency=afterok:"$array" --job-name=prior-shardify-finalize \
  --output="prior-shardify-finalize-%j.out" --wrap "$finalize")
echo "array job $array, finalize job $final"
