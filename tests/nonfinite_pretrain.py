"""`launch/pretrain.py` with a NaN loss injected at chosen optimizer steps (tests only).

`--inject-nonfinite 2,2,2` replaces the loss of the first three micro-batches of step 2 with
NaN on every rank; the rest of the command line is `launch/pretrain.py`'s. Fault injection
lives here, not in the recipe or the training loop.
"""

import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prior_dist.training import cli  # noqa: E402
from prior_dist.training.step import StepRunner  # noqa: E402


def main() -> int:
    argv = sys.argv[1:]
    where = argv.index("--inject-nonfinite")
    pending = Counter(int(s) for s in argv[where + 1].split(","))
    del argv[where : where + 2]
    forward = StepRunner.forward

    def poisoned(self, data, plan, noise):
        out = forward(self, data, plan, noise)
        if pending[self.step] > 0:
            pending[self.step] -= 1
            out = {**out, "total": out["total"] * float("nan")}
        return out

    StepRunner.forward = poisoned
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
