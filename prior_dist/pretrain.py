"""`prior-pretrain` / `python -m prior_dist.pretrain`: pretrain PRIOR from an installed package.

Runs under any launcher: `deepspeed --module prior_dist.pretrain --config ...`, `torchrun
--nproc_per_node N -m prior_dist.pretrain ...`, `srun python -m prior_dist.pretrain ...`, or on
its own as one process. The same command line as `launch/pretrain.py` in a checkout; options:
`prior-pretrain --help`. Recipes and DeepSpeed configs ship with the package (`--recipe demo`,
`--config default` name them); runs and data paths are taken from the working directory.
"""

import sys

from prior_dist.preparation.provision import provide_phantom_shards
from prior_dist.training import cli


def main(argv: list[str] | None = None) -> int:
    """The pretraining command, phantom shards generated on first use where a recipe asks."""
    return cli.main(argv, prepare_data=provide_phantom_shards)


if __name__ == "__main__":
    sys.exit(main())
