"""Pretrain PRIOR: `deepspeed launch/pretrain.py --config configs/default.json [options]`.

Also runs under `torchrun --nproc_per_node N launch/pretrain.py ...` and `srun python
launch/pretrain.py ...`. Options: `python launch/pretrain.py --help`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prior_dist.pretrain import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
