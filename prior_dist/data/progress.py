"""Progress bars for the long-running commands (evaluation fine-tunes and decoding, `stream`,
`shardify verify`): tqdm on stderr when stderr is a terminal, so logs and pipes stay clean.
`PRIOR_PROGRESS=1` forces the bars on (a SLURM log you follow with `tail -f`), `=0` off."""

from __future__ import annotations

import os
import sys

from tqdm import tqdm


def progress_on() -> bool:
    forced = os.environ.get("PRIOR_PROGRESS", "")
    if forced in ("0", "1"):
        return forced == "1"
    return sys.stderr.isatty()


def bar(iterable=None, **kwargs) -> tqdm:
    """`tqdm(iterable, **kwargs)` on stderr, shown when `progress_on()`."""
    return tqdm(iterable, disable=not progress_on(), file=sys.stderr, dynamic_ncols=True, **kwargs)
