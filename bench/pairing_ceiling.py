"""The retrieval ceiling of a synthetic pairing: how well an oracle could retrieve at all.

    python bench/pairing_ceiling.py SHARD_DIR [--split test]

With `shardify openi --render-phantom`, an image is drawn from its report's mapped findings
(name, side, zone, severity) and nothing else of the report. Reports with the same findings get
images that differ only in random anatomy, so even a perfect model cannot tell which of them an
image belongs to. The oracle ranks the reports of the image's own findings first, in random
order: image i's report is within the top k with probability min(1, k / g_i), g_i the number
of test reports with i's findings. The mean over images is the ceiling of Recall@k (image to
text; text to image is the same by symmetry); printed beside chance (k / N).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prior_dist.data.index import ShardReader, ShardSource, SplitIndex  # noqa: E402


def findings_groups(directory: str, split: str) -> list[str]:
    """Each sample's rendered findings, as one canonical string."""
    index = SplitIndex([ShardSource(directory)], split)
    reader = ShardReader()
    out = []
    for i in range(len(index)):
        meta = json.loads(reader.members(index, i)["json"])
        if not meta.get("synthetic_image"):
            raise SystemExit(f"{directory}: {index.key(i)} is not a synthetic pair")
        out.append(json.dumps(meta.get("findings", []), sort_keys=True))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("shards")
    parser.add_argument("--split", default="test")
    args = parser.parse_args()
    groups = findings_groups(args.shards, args.split)
    sizes = Counter(groups)
    n = len(groups)
    print(f"{n} pairs, {len(sizes)} distinct finding sets; {sizes['[]']} with no mapped finding")
    print("| k | oracle Recall@k | chance | oracle / chance |")
    print("|---|---|---|---|")
    for k in (1, 5, 10):
        ceiling = sum(min(1.0, k / sizes[g]) for g in groups) / n
        print(f"| {k} | {ceiling:.3f} | {k / n:.4f} | {ceiling / (k / n):.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
