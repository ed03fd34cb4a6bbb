"""`launch/pretrain.py` whose detached stop-checkpoint writer of rank 0 waits for a gate file
(tests only): `--gate-save PATH` holds rank 0's writer until PATH exists (at most 300 s), so
a test can kill the ranks and start the next run while that save is still being written. The
rest of the command line is `launch/pretrain.py`'s."""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prior_dist.runs import detached  # noqa: E402
from prior_dist.training import cli  # noqa: E402


def main() -> int:
    argv = sys.argv[1:]
    where = argv.index("--gate-save")
    gate = Path(argv[where + 1])
    del argv[where : where + 2]
    write_all = detached._write_all

    def gated(directory, files, rank, *rest):
        deadline = time.monotonic() + 300
        while rank == 0 and not gate.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        return write_all(directory, files, rank, *rest)

    detached._write_all = gated
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
