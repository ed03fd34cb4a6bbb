"""Checkpoints that survive preemption: DeepSpeed states plus our client state, marked complete.

Layout: `RUN_DIR/checkpoints/step00000120/` holds DeepSpeed's files, `rank00000.json` and
`rank00000.safetensors` ... (each rank's loader position and RNG states) and, written last by
rank 0 after every rank finished, `complete.json` with every file's size and SHA-256. Nothing is
unpickled beyond tensors and plain data: DeepSpeed's files pass a weights-only load before
DeepSpeed reads them. A crash during a save leaves a directory without `complete.json`, which
`--resume auto` never picks; the next run removes it before it starts. A complete checkpoint
whose files no longer match their records (truncated, overwritten, scrambled) is set aside as
`damaged-stepN` and `--resume auto` falls back to the previous one, saying so. A resume on
another number of ranks under ZeRO 1-3 converts the checkpoint once to DeepSpeed's universal
form (`stepN/universal/`) and loads that, optimizer moments included.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as save_bytes

from prior_dist.atomic import publish, write_bytes, write_json
from prior_dist.data.shards import sha256_file
from prior_dist.runs.detached import (
    failed_writers,
    live_writers,
    snapshot_deepspeed_save,
    start_writer,
    wait_until,
)
from prior_dist.runs.layout import (
    DAMAGED_PREFIX,
    MARKER,
    MODEL_STATES,
    TAG_PREFIX,
    UNIVERSAL,
    checkpoint_root,
    complete_checkpoints,
    legacy_rank_file,
    rank_files,
    tag_for,
)
from prior_dist.runs.lock import process_running
from prior_dist.runs.safe_load import check_torch_files, safe_legacy_rank_state, safe_torch_load

_NEARLY_FULL_BYTES = 64 * 2**20
FILES = "files"  # complete.json: {name: {"bytes": N, "sha256": HEX}}


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, quota, permissions); names the path."""


def resolve_resume(run_dir: Path, resume: str) -> Path | None:
    """`auto`: the newest complete checkpoint (or None); `none`: None; else that directory."""
    if resume == "none":
        return None
    if resume == "auto":
        found = complete_checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / MARKER).is_file():
        found = ", ".join(str(p) for p in complete_checkpoints(run_dir)) or "none"
        raise ValueError(
            f"--resume {resume}: not a complete checkpoint (no {MARKER}); "
            f"complete ones in the run directory: {found}"
        )
    return path


def _incomplete(run_dir: Path) -> list[Path]:
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return [
        p
        for p in sorted(root.iterdir())
        if p.is_dir() and p.name.startswith(TAG_PREFIX) and not (p / MARKER).is_file()
    ]


def wait_for_writers(run_dir: Path, log=print, poll_s: float = 1.0) -> None:
    """Wait while detached writers (`runs/detached.py`: a stopped run's last save) are still
    completing checkpoints here; a writer that died stops counting (its checkpoint is then
    incomplete)."""
    told = set()
    while busy := {p: w for p in _incomplete(run_dir) if (w := live_writers(p))}:
        for path, writers in busy.items():
            if path not in told:
                log(f"waiting for the writers still saving {path}: {'; '.join(writers)}")
                told.add(path)
        time.sleep(poll_s)


def remove_partial(run_dir: Path) -> list[str]:
    """Delete checkpoint directories that a crashed save left without `complete.json` (never
    one that a live detached writer is completing)."""
    removed = []
    for path in _incomplete(run_dir):
        if not live_writers(path):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed


def _digest(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def file_records(directory: Path, rank: int = 0, world: int = 1) -> dict:
    """Size and SHA-256 of this rank's share (every `world`-th name) of a checkpoint's files."""
    names = sorted(
        p.name
        for p in directory.iterdir()
        if p.is_file() and p.name != MARKER and not p.name.startswith(".")  # in the making
    )
    return {name: _digest(directory / name) for name in names[rank::world]}


def damaged_files(directory: Path, rank: int = 0, world: int = 1) -> list[str]:
    """What is wrong with this rank's share of the files `complete.json` records (all of them
    for rank 0 of 1), one line per file; [] when they match, or when the checkpoint predates
    the records."""
    marker = directory / MARKER
    try:
        records = json.loads(marker.read_text()).get(FILES)
    except (OSError, ValueError, AttributeError) as err:
        return [f"{marker}: unreadable ({err})"] if rank == 0 else []
    if records is None:
        return []
    problems = []
    for name in sorted(records)[rank::world]:
        path, want = directory / name, records[name]
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != want["bytes"]:
            problems.append(
                f"{path}: {path.stat().st_size} bytes, {want['bytes']} recorded (truncated or "
                "overwritten)"
            )
        elif _digest(path)["sha256"] != want["sha256"]:
            problems.append(f"{path}: its SHA-256 differs from the one recorded (corrupted)")
    return problems


def _all_ranks(value: list | dict, merge) -> list | dict:
    """`value` from every rank, merged with `merge` (this rank's alone without a group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, value)  # between this run's own ranks: not user input
    return merge(parts)


def _problems(directory: Path) -> list[str]:
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = damaged_files(directory, rank, world)
    return _all_ranks(mine, lambda parts: sorted(p for part in parts for p in part))


def newest_intact(run_dir: Path, problems_of=damaged_files) -> tuple[Path | None, list]:
    """The newest complete checkpoint whose files pass `problems_of` (None when none does), and
    `(path, problems)` for each damaged one newer than it, newest first."""
    damaged = []
    for path in reversed(complete_checkpoints(run_dir)):
        problems = problems_of(path)
        if not problems:
            return path, damaged
        damaged.append((path, problems))
    return None, damaged


def choose_checkpoint(run_dir: Path, resume: str, log=print) -> Path | None:
    """The checkpoint to resume from, its files checked against `complete.json` (every rank
    checks a share and all agree). `auto`: the newest intact one; damaged newer ones are set
    aside as `damaged-stepN` with a warning naming the bad files. A damaged checkpoint named
    with `--resume PATH`, or no intact one at all, is an error naming the files."""
    if resume != "auto":
        path = resolve_resume(run_dir, resume)
        problems = _problems(path) if path is not None else []
        if problems:
            raise ValueError(f"--resume {resume}: damaged checkpoint: " + "; ".join(problems))
        return path
    path, damaged = newest_intact(run_dir, _problems)
    if path is not None:
        for bad, why in damaged:
            _set_aside(bad, why, path, log)
        return path
    if damaged:
        found = "; ".join(f"{p.name}: {', '.join(why)}" for p, why in damaged)
        raise ValueError(
            f"{checkpoint_root(run_dir)}: every complete checkpoint is damaged ({found}); "
            "restore the files, or start over with --resume none"
        )
    return None


def _set_aside(path: Path, problems: list[str], fallback: Path, log) -> None:
    """Rename a damaged checkpoint so no later run picks it (rank 0; every rank waits)."""
    target = path.with_name(DAMAGED_PREFIX + path.name)
    log(
        f"WARNING: checkpoint {path} is damaged: {'; '.join(problems[:4])}; resuming from the "
        f"previous complete checkpoint {fallback} instead; the damaged one is kept as {target}"
    )
    if not dist.is_initialized() or dist.get_rank() == 0:
        if target.exists():
            shutil.rmtree(target)
        path.rename(target)
    if dist.is_initialized():
        dist.barrier()


def rng_state() -> dict:
    """Every RNG stream of this process: JSON-able values, and tensors under `tensors`."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    return {
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss_next],
        "tensors": tensors,
    }


def set_rng_state(state: dict) -> None:
    tensors = state["tensors"]
    torch.set_rng_state(tensors["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


def _rank_state_files(checkpoint: Path, rank: int, rank_state: dict) -> dict[Path, bytes]:
    """`{"loader": ..., "rng": rng_state()}` as the bytes of its safetensors file (RNG tensors)
    and its JSON file (the rest), in that order: the JSON is written last."""
    values, tensors = rank_files(checkpoint, rank)
    rng = {k: v for k, v in rank_state["rng"].items() if k != "tensors"}
    return {
        tensors: save_bytes(rank_state["rng"]["tensors"]),
        values: json.dumps({"loader": rank_state["loader"], "rng": rng}).encode(),
    }


def _save_rank_state(checkpoint: Path, rank: int, rank_state: dict) -> None:
    for path, data in _rank_state_files(checkpoint, rank, rank_state).items():
        write_bytes(path, data)


def _load_rank_state(checkpoint: Path, rank: int) -> dict | None:
    values, tensors = rank_files(checkpoint, rank)
    if values.is_file():
        state = json.loads(values.read_text())
        state["rng"]["tensors"] = load_file(str(tensors))
        return state
    legacy = legacy_rank_file(checkpoint, rank)
    if not legacy.is_file():
        return None
    old = safe_legacy_rank_state(legacy)
    rng = old["rng"]
    name, keys, pos, has_gauss, cached = rng["numpy"]
    tensors = {k: rng[k] for k in ("torch", "cuda") if k in rng}
    return {
        "loader": old["loader"],
        "rng": {
            "numpy": [name, np.asarray(keys).tolist(), pos, has_gauss, cached],
            "python": [rng["python"][0], list(rng["python"][1]), rng["python"][2]],
            "tensors": tensors,
        },
    }


def save_checkpoint(
    engine,
    run_dir: Path,
    step: int,
    client_state: dict,
    rank_state: dict,
    keep_last: int,
    detached: bool = False,
) -> Path:
    """Save on every rank (a collective); returns the checkpoint directory. `detached` (a save
    made to stop): the files go through host memory to a writer process that outlives this
    one (`runs/detached.py`); this rank waits for its writer, and the last writer to finish
    writes `complete.json`."""
    root = checkpoint_root(run_dir)
    tag = tag_for(step)
    rank, world = dist.get_rank(), dist.get_world_size()
    marker = {
        "step": step,
        "world_size": world,
        "zero_stage": engine.zero_optimization_stage(),
        "stage": client_state.get("stage"),
        "epoch": client_state.get("epoch"),
        "global_batch": client_state.get("global_batch"),
    }
    if detached:
        _save_detached(engine, root, tag, client_state, rank_state, marker, keep_last)
        return root / tag
    try:
        engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
        _save_rank_state(root / tag, rank, rank_state)
    except (OSError, RuntimeError) as err:  # torch.save reports ENOSPC as a RuntimeError
        raise _write_error(root / tag, rank, err) from err
    dist.barrier()
    records = _all_ranks(
        file_records(root / tag, rank, world),
        lambda parts: {k: v for p in parts for k, v in p.items()},
    )
    if rank == 0:
        marker[FILES] = records
        try:
            write_json(root / tag / MARKER, marker)
        except OSError as err:
            raise _write_error(root / tag, rank, err) from err
        _prune(root, keep_last)
    dist.barrier()
    return root / tag


def _save_detached(engine, root, tag, client_state, rank_state, marker, keep_last) -> None:
    """DeepSpeed's files and this rank's state serialized in memory, then written by a
    detached writer that this rank waits for (it finishes even if this rank is killed)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    directory = root / tag

    def deepspeed_save():
        engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)

    try:
        snapshot = snapshot_deepspeed_save(engine, deepspeed_save)
    except (OSError, RuntimeError) as err:
        raise _write_error(directory, rank, err) from err
    files = {}
    for path, data in snapshot.items():
        if Path(path).parent != directory:
            raise RuntimeError(f"DeepSpeed saved {path} outside the checkpoint {directory}")
        files[Path(path).name] = data
    for path, data in _rank_state_files(directory, rank, rank_state).items():
        files[path.name] = data
    pid = start_writer(directory, files, rank, world, marker, lambda: _prune(root, keep_last))
    wait_until(lambda: not process_running(pid), poll_s=0.2)
    failed = [f for f in failed_writers(directory) if f.startswith(f"rank {rank}'s")]
    if failed:
        raise CheckpointWriteError(f"saving checkpoint {directory} failed: {failed[0]}")


def _write_error(directory: Path, rank: int, err: Exception) -> CheckpointWriteError:
    """The failed save's path, the cause and the free space left where it was writing. (torch
    reports a full disk as "unexpected pos N vs M", so the free space is what tells.)"""
    cause = " ".join(str(err).split())[:300] or type(err).__name__
    full = getattr(err, "errno", None) == errno.ENOSPC
    try:
        usage = shutil.disk_usage(directory if directory.exists() else directory.parent)
        space = f"{usage.free / 2**20:.1f} MiB free of {usage.total / 2**20:.1f} MiB there"
        full = full or usage.free < min(_NEARLY_FULL_BYTES, usage.total // 100)
    except OSError:
        space = "free space unknown"
    hint = " (the file system is full: free space or point --run-dir elsewhere)" if full else ""
    return CheckpointWriteError(
        f"rank {rank}: saving checkpoint {directory} failed: {cause}; {space}{hint}. It has no "
        f"{MARKER}, so no resume will pick it; the previous complete checkpoint is intact"
    )


def _prune(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints (incomplete ones are removed at start-up
    by `remove_partial`)."""
    for old in complete_checkpoints(root.parent)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def needs_universal(path: Path | None, world: int) -> bool:
    """Whether resuming checkpoint `path` on `world` ranks goes through DeepSpeed's universal
    form: its ZeRO 1-3 optimizer states were partitioned over another number of ranks."""
    if path is None:
        return False
    marker = json.loads((path / MARKER).read_text())
    return marker["world_size"] != world and marker["zero_stage"] >= 1


def saved_global_batch(path: Path, accumulation: int) -> int | None:
    """The samples per optimizer step checkpoint `path` trained with (None when unknown). For
    checkpoints that predate the record: rank 0's loader (ranks x micro-batch) x
    `accumulation`, the accumulation assumed unchanged."""
    marker = json.loads((path / MARKER).read_text())
    if marker.get("global_batch"):
        return int(marker["global_batch"])
    values, _ = rank_files(path, 0)
    if not values.is_file():
        return None
    loader = json.loads(values.read_text())["loader"]
    return int(loader["world_size"]) * int(loader["micro_batch_size"]) * accumulation


def _rank0_verdict(problem: str) -> str:
    """Rank 0's `problem` on every rank (one broadcast, so no rank waits for one that gave up)."""
    box = [problem]
    dist.broadcast_object_list(box, src=0)  # between this run's own ranks: not user input
    return box[0]


def universal_copy(path: Path, log=print) -> Path:
    """Checkpoint `path` in DeepSpeed's universal form, `path/universal/`: converted by rank 0
    the first time (after the weights-only check of `path`, into a temporary folder renamed
    when whole), reused after that; its files pass the weights-only check on every rank."""
    target = path / UNIVERSAL
    problem = ""
    if dist.get_rank() == 0 and not target.is_dir():
        try:
            seconds = convert_to_universal(path, target)
            log(f"converted {path} to DeepSpeed's universal form in {seconds:.1f} s: {target}")
        except (AssertionError, RuntimeError, OSError, KeyError, ValueError) as err:
            reason = " ".join(str(err).split())[:300] or type(err).__name__
            problem = f"converting checkpoint {path} to DeepSpeed's universal form failed: {reason}"
    problem = _rank0_verdict(problem)
    if problem:
        raise ValueError(problem)
    check_torch_files(target, recursive=True)
    return target


def _restore_buffers(engine, path: Path) -> None:
    """DeepSpeed's universal loading restores parameters alone: the module's buffers (batch
    norm statistics and counters) come from the checkpoint's model states, rank 0's, as on a
    resume on the same number of ranks."""
    names = [MODEL_STATES, "zero_pp_rank_0_" + MODEL_STATES]  # ZeRO 1-2, ZeRO-3
    found = [path / name for name in names if (path / name).is_file()]
    if not found:
        raise ValueError(f"checkpoint {path}: no model states ({' or '.join(names)})")
    state = safe_torch_load(found[0], deepspeed_types=True).get("module") or {}
    with torch.no_grad():
        for name, buffer in engine.module.named_buffers():
            if name in state:
                buffer.copy_(state[name])


def convert_to_universal(path: Path, target: Path) -> float:
    # deepspeed takes seconds to import; only a resume on another number of ranks converts.
    from deepspeed.checkpoint import ds_to_universal

    tmp = path / f".{UNIVERSAL}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    args = argparse.Namespace(
        input_folder=str(path),
        output_folder=str(tmp),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=True,  # the version marker our saves do not carry
    )
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ds_to_universal.main(args)  # prints its progress; we say one line instead
        publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        (path / "latest_universal").unlink(missing_ok=True)  # its pointer; we name the folder
    return time.perf_counter() - start


def load_checkpoint(engine, path: Path, log=print) -> tuple[dict, dict | None]:
    """Restore DeepSpeed states; returns (client_state, this rank's state or None).

    On another number of ranks, ZeRO 1-3 states (partitioned by rank) load from the
    checkpoint's universal form (`universal_copy`), with Adam's moments; the engine must have
    been built with `checkpoint.load_universal` (`needs_universal`). ZeRO-0 states are whole.
    The loader position does not depend on the number of ranks; the per-rank states (RNG) are
    restored only on the same number.
    """
    marker = json.loads((path / MARKER).read_text())
    world = dist.get_world_size()
    stage = engine.zero_optimization_stage()
    if marker["zero_stage"] != stage:
        raise ValueError(
            f"checkpoint {path} was written with ZeRO stage {marker['zero_stage']}; "
            f"this run uses stage {stage}: use the same DeepSpeed config"
        )
    check_torch_files(path)  # DeepSpeed's own loader unpickles everything: look first
    source = path
    if needs_universal(path, world):
        log(
            f"checkpoint {path} was written by {marker['world_size']} ranks under ZeRO stage "
            f"{stage}; this run has {world}: loading its universal form"
        )
        source = universal_copy(path, log)
    try:
        load_path, client = engine.load_checkpoint(
            str(source.parent),
            tag=source.name,
            load_optimizer_states=True,
            load_lr_scheduler_states=False,
        )
    except (RuntimeError, OSError, EOFError, KeyError, AssertionError) as err:
        reason = " ".join(str(err).split())[:300] or type(err).__name__
        raise ValueError(f"DeepSpeed could not load the checkpoint in {source}: {reason}") from err
    if load_path is None:
        raise ValueError(f"DeepSpeed could not load the checkpoint in {source}")
    if source != path:
        _restore_buffers(engine, path)
    try:
        rank_state = (
            _load_rank_state(path, dist.get_rank()) if marker["world_size"] == world else None
        )
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        raise ValueError(f"{path}: rank {dist.get_rank()}'s state is unreadable: {err}") from err
    return client or {}, rank_state
