"""Shard building: deterministic planning, parallel workers, array-task parts, finalize, reindex,
verify."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import multiprocessing as mp
import signal
import tarfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from prior_dist import __version__
from prior_dist.atomic import write_json
from prior_dist.data.compact import (
    build_compact,
    check_compact,
    compact_name,
    open_compact,
    shards_digest,
    write_compact,
)
from prior_dist.data.progress import bar
from prior_dist.data.shards import (
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    SkipCounter,
    index_path,
    load_index,
    load_manifest,
    sha256_file,
    shard_complete,
    shard_name,
    write_shard,
)
from prior_dist.preparation.sources import StudyRecord
from prior_dist.preparation.study import PrepareSettings, Skip, prepare_study

SPLIT_ORDER = ("train", "validate", "test")


def settings_digest(settings: PrepareSettings, shard_size: int, source: dict) -> str:
    blob = json.dumps(
        {"settings": asdict(settings), "shard_size": shard_size, "source": source}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def plan_shards(
    records: list[StudyRecord], shard_size: int
) -> list[tuple[str, str, list[StudyRecord]]]:
    """Assign studies to shards: per split, sorted by key, consecutive runs of `shard_size`.

    The plan depends only on the input, never on the number of workers or array tasks.
    """
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    by_split: dict[str, list[StudyRecord]] = {}
    for record in records:
        by_split.setdefault(record.split, []).append(record)
    splits = [s for s in SPLIT_ORDER if s in by_split] + sorted(set(by_split) - set(SPLIT_ORDER))
    plan = []
    for split in splits:
        ordered = sorted(by_split[split], key=lambda r: r.key)
        for index, start in enumerate(range(0, len(ordered), shard_size)):
            plan.append((shard_name(split, index), split, ordered[start : start + shard_size]))
    return plan


def _build_one(job: tuple[Path, str, list[StudyRecord], PrepareSettings, str]) -> dict:
    out_dir, name, records, settings, digest = job
    skipped = SkipCounter()
    notes = SkipCounter()
    samples = []
    for record in records:
        try:
            members, study_notes = prepare_study(record, settings)
        except Skip as skip:
            skipped.add(skip.reason, record.key)
            continue
        for note in study_notes:
            notes.add(note, record.key)
        samples.append((record.key, members))
    index = write_shard(out_dir, name, samples)
    index.update(
        {
            "settings_digest": digest,
            "planned": len(records),
            "skipped": skipped.to_dict(),
            "notes": notes.to_dict(),
        }
    )
    write_json(index_path(out_dir, name), index, indent=1)
    return index


def _part_path(out_dir: Path, task_index: int, num_tasks: int) -> Path:
    return out_dir / f"manifest.part-{task_index:05d}-of-{num_tasks:05d}.json"


def _pending_jobs(out: Path, mine: list, settings: PrepareSettings, digest: str):
    """(the shard jobs still to write, how many complete shards are reused); a complete shard
    written with other settings is refused, and stale temporary files are removed."""
    todo, reused = [], 0
    for name, _split, shard_records in mine:
        if shard_complete(out, name):
            existing = load_index(out, name)
            if existing.get("settings_digest") != digest:
                raise ValueError(
                    f"{out / name}.tar was written with other settings or input; "
                    "use a new --out directory or delete the old shards"
                )
            reused += 1
            continue
        for stale in out.glob(f".{name}.tar.tmp.*"):
            stale.unlink()
        todo.append((out, name, shard_records, settings, digest))
    return todo, reused


def _run_jobs(todo: list, workers: int, bar) -> int:
    """Write the shards (in a spawn pool when there are workers to use); samples written."""
    if workers == 1 or len(todo) <= 1:
        return _tally(map(_build_one, todo), bar)
    with _sigint_ignored_by_children():
        pool = mp.get_context("spawn").Pool(min(workers, len(todo)))
    with pool:
        return _tally(pool.imap_unordered(_build_one, todo), bar)


@contextlib.contextmanager
def _sigint_ignored_by_children():
    """Workers started inside inherit SIGINT ignored from their first instruction (a handler
    set after start-up leaves a window): Ctrl-C is the main process's, which stops the pool,
    with no traceback from each worker."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _tally(indexes, bar) -> int:
    written = 0
    for index in indexes:
        written += index["num_samples"]
        if bar:
            bar.update(index["planned"])
    if bar:
        bar.close()
    return written


def build_shards(
    records: list[StudyRecord],
    enumeration_skips: SkipCounter,
    source: dict,
    settings: PrepareSettings,
    out_dir: str | Path,
    shard_size: int = 1000,
    workers: int = 1,
    num_tasks: int = 1,
    task_index: int = 0,
    progress: bool = True,
) -> dict:
    """Write this task's shards (skipping completed ones) and its part manifest.

    With one task the manifest is finalised at once; array jobs run `finalize` afterwards.
    Returns a summary of what this task did.
    """
    if num_tasks < 1 or not 0 <= task_index < num_tasks:
        raise ValueError(
            f"--task-index must be in [0, {num_tasks}), got {task_index} (--num-tasks {num_tasks})"
        )
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    digest = settings_digest(settings, shard_size, source)
    plan = plan_shards(records, shard_size)
    mine = [entry for i, entry in enumerate(plan) if i % num_tasks == task_index]
    todo, reused = _pending_jobs(out, mine, settings, digest)
    start = time.perf_counter()
    bar = None
    if progress:
        total = sum(len(job[2]) for job in todo)
        bar = tqdm(total=total, unit="sample", desc=f"shardify task {task_index}/{num_tasks}")
    written = _run_jobs(todo, workers, bar)
    elapsed = time.perf_counter() - start
    part = {
        "task_index": task_index,
        "num_tasks": num_tasks,
        "settings_digest": digest,
        "source": source,
        "settings": asdict(settings) | {"shard_size": shard_size},
        "planned_shards": [name for name, _, _ in plan],
        "planned_samples": {name: len(rs) for name, _, rs in plan},
        "enumeration_skipped": enumeration_skips.to_dict(),
        "tool_version": __version__,
    }
    write_json(_part_path(out, task_index, num_tasks), part, indent=1)
    summary = {
        "shards_written": len(todo),
        "shards_reused": reused,
        "samples_written": written,
        "seconds": round(elapsed, 3),
        "samples_per_second": round(written / elapsed, 1) if elapsed > 0 else None,
    }
    if num_tasks == 1:
        summary["manifest"] = finalize(out)
    return summary


def _merge_indexes(out: Path, first: dict) -> tuple[dict, SkipCounter, SkipCounter]:
    """Per split, the shard entries of the manifest; the skips and notes of every shard."""
    skipped = SkipCounter()
    skipped.merge(first["enumeration_skipped"])
    notes = SkipCounter()
    splits: dict[str, dict] = {}
    for name in first["planned_shards"]:
        index = load_index(out, name)
        skipped.merge(index["skipped"])
        notes.merge(index["notes"])
        split = name.rsplit("-", 1)[0]
        entry = splits.setdefault(split, {"num_samples": 0, "shards": []})
        entry["num_samples"] += index["num_samples"]
        entry["shards"].append(
            {
                "name": name,
                "file": index["file"],
                "num_samples": index["num_samples"],
                "size_bytes": index["size_bytes"],
                "sha256": index["sha256"],
                "index": index_path(out, name).name,
            }
        )
    return splits, skipped, notes


def finalize(out_dir: str | Path) -> dict:
    """Merge the array tasks' parts and shard indexes into ``manifest.json``."""
    out = Path(out_dir)
    parts = sorted(out.glob("manifest.part-*-of-*.json"))
    if not parts:
        raise FileNotFoundError(f"{out}: no manifest.part-*.json files (did shardify run here?)")
    loaded = [json.loads(p.read_text()) for p in parts]
    num_tasks = loaded[0]["num_tasks"]
    digests = {p["settings_digest"] for p in loaded if p["num_tasks"] == num_tasks}
    if len(digests) != 1 or any(p["num_tasks"] != num_tasks for p in loaded):
        raise ValueError(
            f"{out}: parts come from runs with different settings or task counts: "
            f"{[p.name for p in parts]}"
        )
    present = {p["task_index"] for p in loaded}
    missing_tasks = sorted(set(range(num_tasks)) - present)
    if missing_tasks:
        raise ValueError(
            f"{out}: array task(s) {missing_tasks} of {num_tasks} have not finished "
            "(no manifest.part file); re-run them, then finalize"
        )
    first = loaded[0]
    incomplete = [n for n in first["planned_shards"] if not shard_complete(out, n)]
    if incomplete:
        raise ValueError(
            f"{out}: {len(incomplete)} planned shard(s) incomplete, e.g. {incomplete[:3]}"
        )
    splits, skipped, notes = _merge_indexes(out, first)
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tool_version": first["tool_version"],
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": first["source"],
        "settings": first["settings"],
        "settings_digest": first["settings_digest"],
        "splits": splits,
        "totals": {
            "samples": sum(s["num_samples"] for s in splits.values()),
            "shards": sum(len(s["shards"]) for s in splits.values()),
            "skipped": skipped.total(),
        },
        "skipped": skipped.to_dict(),
        "notes": notes.to_dict(),
    }
    # Every study the source listed is either in a shard or counted as skipped.
    manifest["totals"]["studies_seen"] = (
        manifest["totals"]["samples"] + manifest["totals"]["skipped"]
    )
    write_json(out / MANIFEST, manifest, indent=1)
    reindex(out, manifest)
    return {
        "samples": manifest["totals"]["samples"],
        "shards": manifest["totals"]["shards"],
        "skipped": manifest["totals"]["skipped"],
    }


def reindex(out_dir: str | Path, manifest: dict | None = None) -> dict[str, int]:
    """(Re)write every split's consolidated index from the shard indexes; samples per split."""
    out = Path(out_dir)
    manifest = manifest or load_manifest(out)
    counts = {}
    for split, entry in manifest["splits"].items():
        index = build_compact(out, entry["shards"])
        write_compact(out / compact_name(split), index, split)
        counts[split] = len(index)
    return counts


def _verify_compact(out: Path, manifest: dict) -> list[str]:
    """Each split's consolidated index, where there is one, against the manifest and the shard
    indexes (a missing one is not a problem: the loader builds it)."""
    problems = []
    for split, entry in manifest["splits"].items():
        path = out / compact_name(split)
        if not path.is_file():
            continue
        try:
            index = open_compact(path)
            problem = check_compact(index, path)
        except (ValueError, KeyError, TypeError) as exc:
            problems.append(str(exc))
            continue
        if index.digest != shards_digest(entry["shards"]):
            problems.append(f"{path}: stale (built for another shard list; shardify reindex)")
            continue
        try:
            truth = build_compact(out, entry["shards"])
        except (FileNotFoundError, ValueError):
            continue  # the shard checks name that problem
        same = problem is None and truth.exts == index.exts
        same = same and all(
            np.array_equal(a, b) for a, b in zip(truth.arrays().values(), index.arrays().values())
        )
        if not same:
            problems.append(problem or f"{path}: differs from the shard indexes; shardify reindex")
    return problems


def _check_image(data: bytes, what: str, problems: list[str]) -> None:
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except Exception as exc:  # any decoder failure is a verify failure
        problems.append(f"{what}: image does not decode: {exc}")


def verify(out_dir: str | Path) -> list[str]:
    """Re-read every shard against the manifest; return a list of problems (empty when sound)."""
    out = Path(out_dir)
    problems: list[str] = []
    manifest = load_manifest(out)
    shards = [shard for entry in manifest["splits"].values() for shard in entry["shards"]]
    for shard in bar(shards, desc=f"verify {out}", unit="shard"):
        problems += _verify_shard(out, shard)
    return problems + _verify_compact(out, manifest)


def _verify_shard(out: Path, shard: dict) -> list[str]:
    """One shard against its manifest entry (size, sha256) and its index (every member)."""
    path = out / shard["file"]
    if not path.is_file():
        return [f"{path}: missing"]
    problems = []
    if path.stat().st_size != shard["size_bytes"]:
        problems.append(f"{path}: {path.stat().st_size} bytes, manifest says {shard['size_bytes']}")
    digest = sha256_file(path)
    if digest != shard["sha256"]:
        problems.append(
            f"{path}: sha256 {digest[:12]}... does not match the manifest's "
            f"{shard['sha256'][:12]}..."
        )
    try:
        index = load_index(out, shard["name"])
    except (FileNotFoundError, ValueError) as exc:
        return problems + [str(exc)]
    expected = {s["key"]: s["members"] for s in index["samples"]}
    try:
        seen = _verify_members(path, expected, problems)
    except (tarfile.TarError, OSError, EOFError) as exc:
        return problems + [f"{path}: unreadable tar: {exc}"]
    if len(seen) != shard["num_samples"]:
        problems.append(f"{path}: {len(seen)} samples, manifest says {shard['num_samples']}")
    for key, members in expected.items():
        if seen.get(key, set()) != set(members):
            problems.append(
                f"{path}: sample {key} members {sorted(seen.get(key, []))}, "
                f"index says {sorted(members)}"
            )
    return problems


def _verify_members(path: Path, expected: dict, problems: list[str]) -> dict[str, set]:
    """Every tar member at its indexed offset and decodable; returns the extensions seen per
    sample key."""
    seen: dict[str, set] = {}
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            if key not in expected:
                problems.append(f"{path}: member {member.name} not in the shard index")
                continue
            offset, size = expected[key].get(ext, (None, None))
            if (offset, size) != (member.offset_data, member.size):
                problems.append(
                    f"{path}: {member.name} at offset {member.offset_data}, index says {offset}"
                )
            data = tar.extractfile(member).read()
            seen.setdefault(key, set()).add(ext)
            if ext == "json":
                try:
                    json.loads(data)
                except json.JSONDecodeError as exc:
                    problems.append(f"{path}: {member.name}: invalid JSON: {exc}")
            else:
                _check_image(data, f"{path}: {member.name}", problems)
    return seen
