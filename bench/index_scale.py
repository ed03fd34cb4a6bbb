"""The split index at scale: the old per-sample Python index against the memory-mapped one.

    python bench/index_scale.py [--sizes 80000,804000,2410000,10000000] [--workers 4]
        [--old-code e1d02a7] [--work /tmp/prior_index_bench] [--out bench/results/index.json]

A fake large data set: one real 1,000-sample phantom shard, listed N/1000 times in a manifest
(each entry its own name, its `.idx.json` a link to the real one), so every index entry is real
and every batch is read from a real tar. For each N, in a fresh process each:

- **old**: `PriorLoader` of commit `--old-code` (the last one with the lists-of-dicts index),
  unpacked with `git archive` and imported instead of this tree;
- **new**: this tree's `PriorLoader` on the consolidated index, after `shardify reindex` (its
  one-time cost is printed too).

Measured: construction, time to the first batch (from before the constructor), the epoch
order alone, and per process (the main one and each of `--workers` DataLoader workers, after
2 x workers batches), from /proc/PID/smaps_rollup: RSS, anonymous memory, private memory (USS:
private clean + private dirty pages) and PSS. "Bytes per sample", above the same process at
1,000 samples and divided by N: the main process's anonymous memory (everything it allocated,
whether its forked workers still share the pages or not) and the worst worker's private memory
(what it copied or allocated itself; a worker of the old index copies the pages of the Python
objects it touches, so its share grows over an epoch: the figure after a few batches is a lower
bound). The consolidated index is file-backed: its pages are the page cache's, shared by every
process on the node, and only those touched are resident.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The child imports the code under test: this tree, or the old commit's (PRIOR_BENCH_CODE).
sys.path.insert(0, os.environ.get("PRIOR_BENCH_CODE", str(REPO)))
os.environ.setdefault("OMP_NUM_THREADS", "1")

BASE_SAMPLES = 1000


def smaps(pid: int) -> dict[str, int]:
    """kB fields of /proc/PID/smaps_rollup."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        out[name] = int(value.split()[0])
    return out


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def process_memory(pid: int) -> dict:
    m = smaps(pid)
    return {
        "uss_mb": (m["Private_Clean"] + m["Private_Dirty"]) / 1024,
        "pss_mb": m["Pss"] / 1024,
        "rss_mb": m["Rss"] / 1024,
        "anon_mb": m["Anonymous"] / 1024,
    }


def child(directory: str, workers: int, batch: int) -> dict:
    """One measurement in this process (the code under test comes from sys.path[0])."""
    import torch

    from prior_dist.data import index as index_module
    from prior_dist.data.loader import PriorLoader
    from prior_dist.data.tokenize import build_wordpiece
    from prior_dist.data.transforms import TransformConfig

    torch.set_num_threads(1)
    tokenizer = build_wordpiece(directory, Path(directory).parent / "wordpiece", vocab_size=400)
    start = time.perf_counter()
    loader = PriorLoader(
        directory,
        tokenizer,
        batch,
        rank=0,
        world_size=1,
        num_workers=workers,
        seed=1,
        transform=TransformConfig(image_size=64),
    )
    constructed = time.perf_counter() - start
    batches = iter(loader)
    first = next(batches)
    first_batch = time.perf_counter() - start
    for _ in range(2 * workers):
        next(batches)
    main = process_memory(os.getpid())
    workers_memory = [process_memory(pid) for pid in children(os.getpid())]
    order_start = time.perf_counter()
    index_module.epoch_order(loader.index, 1, 1, True)
    order_s = time.perf_counter() - order_start
    del batches
    return {
        "samples": len(loader.index),
        "code": str(Path(index_module.__file__).parents[2]),
        "construct_s": constructed,
        "first_batch_s": first_batch,
        "first_batch_size": len(first["input_ids"]),
        "epoch_order_s": order_s,
        "main": main,
        "workers": workers_memory,
        "total_pss_mb": main["pss_mb"] + sum(w["pss_mb"] for w in workers_memory),
    }


def base_shard(work: Path) -> Path:
    """One real train shard of exactly 1,000 phantom studies at 64 px (made once)."""
    base = work / "base"
    if (base / "manifest.json").is_file():
        return base
    from prior_dist.preparation.build import build_shards
    from prior_dist.preparation.sources import enumerate_phantom
    from prior_dist.preparation.study import PrepareSettings

    records, skipped, source = enumerate_phantom(1400, seed=5)
    records = [r for r in records if r.split == "train"][:BASE_SAMPLES]
    assert len(records) == BASE_SAMPLES, len(records)
    build_shards(
        records,
        skipped,
        source,
        PrepareSettings(image_size=64, phantom_seed=5),
        base,
        shard_size=BASE_SAMPLES,
        progress=False,
    )
    return base


def fake_dataset(base: Path, work: Path, samples: int) -> Path:
    """A manifest listing the base shard samples/1000 times; each entry's index a link."""
    out = work / f"n{samples}"
    if (out / "manifest.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((base / "manifest.json").read_text())
    shard = manifest["splits"]["train"]["shards"][0]
    tar = out / shard["file"]
    if not tar.exists():
        tar.symlink_to(base / shard["file"])
    entries = []
    for i in range(samples // BASE_SAMPLES):
        name = f"train-{i:06d}"
        link = out / f"{name}.idx.json"
        if not link.exists():
            link.symlink_to(base / f"{shard['name']}.idx.json")
        entries.append(shard | {"name": name, "index": link.name})
    manifest["splits"] = {"train": {"num_samples": len(entries) * BASE_SAMPLES, "shards": entries}}
    manifest["totals"] = {"samples": len(entries) * BASE_SAMPLES, "shards": len(entries)}
    (out / "manifest.tmp").write_text(json.dumps(manifest))
    os.replace(out / "manifest.tmp", out / "manifest.json")
    return out


def old_code(work: Path, commit: str) -> Path:
    """The old commit's `prior_dist` package, unpacked once."""
    root = work / f"code-{commit}"
    if not (root / "prior_dist").is_dir():
        root.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", commit, "prior_dist"],
            check=True,
            capture_output=True,
        ).stdout
        import io

        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(root, filter="data")
    return root


def measure(directory: Path, code: Path | None, args) -> dict:
    env = dict(os.environ)
    if code is not None:
        env["PRIOR_BENCH_CODE"] = str(code)
    result = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            str(directory),
            "--workers",
            str(args.workers),
            "--batch",
            str(args.batch),
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"child on {directory} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def reindex_seconds(directory: Path) -> float:
    from prior_dist.preparation.build import reindex

    for stale in directory.glob("*.index.bin"):
        stale.unlink()
    start = time.perf_counter()
    reindex(directory)
    return time.perf_counter() - start


def per_sample(run: dict, base: dict) -> dict:
    """Bytes per sample above the 1,000-sample run: the main process's anonymous memory (all it
    allocated, shared with its forked workers or not) and the worst worker's private memory."""
    n = run["samples"] - base["samples"]
    worst = max((w["uss_mb"] for w in run["workers"]), default=0.0)
    base_worst = max((w["uss_mb"] for w in base["workers"]), default=0.0)
    return {
        "main_bytes_per_sample": (run["main"]["anon_mb"] - base["main"]["anon_mb"]) * 2**20 / n,
        "worker_bytes_per_sample": (worst - base_worst) * 2**20 / n,
    }


def row(kind: str, run: dict, extra: dict, reindex_s: float | None) -> str:
    workers = run["workers"]
    worst = max((w["uss_mb"] for w in workers), default=0.0)
    once = "" if reindex_s is None else f"{reindex_s:.1f} s"
    return (
        f"| {run['samples']:,} | {kind} | {once} | {run['construct_s']:.2f} s | "
        f"{run['first_batch_s']:.2f} s | {run['epoch_order_s']:.2f} s | "
        f"{run['main']['rss_mb']:,.0f} / {run['main']['anon_mb']:,.0f} MB | {worst:,.0f} MB | "
        f"{extra['main_bytes_per_sample']:.0f} / {extra['worker_bytes_per_sample']:.0f} | "
        f"{run['total_pss_mb']:,.0f} MB |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="80000,804000,2410000,10000000")
    parser.add_argument("--old-max", type=int, default=10_000_000, help="largest N for old")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--old-code", default="e1d02a7")
    parser.add_argument("--work", default="/tmp/prior_index_bench")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.workers, args.batch)))
        return 0
    work = Path(args.work)
    base = base_shard(work)
    old = old_code(work, args.old_code)
    sizes = [int(s) for s in args.sizes.split(",")]
    reference = fake_dataset(base, work, BASE_SAMPLES)
    baselines = {"old": measure(reference, old, args)}
    reindex_seconds(reference)
    baselines["new"] = measure(reference, None, args)
    results = []
    print(
        "| samples | index | one-time reindex | construct | first batch | epoch order | "
        "main RSS / anonymous | worst worker private | bytes/sample main / worker | total PSS |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in sizes:
        directory = fake_dataset(base, work, n)
        for kind in ("old", "new"):
            if kind == "old" and n > args.old_max:
                continue
            seconds = reindex_seconds(directory) if kind == "new" else None
            run = measure(directory, old if kind == "old" else None, args)
            extra = per_sample(run, baselines[kind])
            results.append({"kind": kind, "reindex_s": seconds, **run, **extra})
            print(row(kind, run, extra, seconds), flush=True)
    summary = {
        "command": " ".join([sys.executable, *sys.argv]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_version()}",
        "baselines": baselines,
        "results": results,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
