"""Checkpoints that survive preemption: DeepSpeed states plus our client state, marked complete.

Layout: `RUN_DIR/checkpoints/step00000120/` holds DeepSpeed's files, `rank00000.json` and
`rank00000.safetensors` ... (each rank's loader position and RNG states) and, written last by
rank 0 after every rank finished, `complete.json`. Nothing is unpickled beyond tensors and plain
data: DeepSpeed's files pass a weights-only load before DeepSpeed reads them. A crash during a
save leaves a directory without `complete.json`, which `--resume auto` never picks; the next
run removes it before it starts.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from prior_dist.runs.layout import (
    MARKER,
    checkpoint_root,
    complete_checkpoints,
    legacy_rank_file,
    rank_files,
    tag_for,
)
from prior_dist.runs.safe_load import check_torch_files, safe_legacy_rank_state


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


def remove_partial(run_dir: Path) -> list[str]:
    """Delete checkpoint directories that a crashed save left without `complete.json`."""
    root = checkpoint_root(run_dir)
    removed = []
    if root.is_dir():
        for path in sorted(root.iterdir()):
            if path.is_dir() and not (path / MARKER).is_file():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path.name)
    return removed


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


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _save_rank_state(checkpoint: Path, rank: int, rank_state: dict) -> None:
    """`{"loader": ..., "rng": rng_state()}` as JSON + safetensors; the JSON is written last."""
    values, tensors = rank_files(checkpoint, rank)
    rng = {k: v for k, v in rank_state["rng"].items() if k != "tensors"}
    _atomic(tensors, lambda tmp: save_file(rank_state["rng"]["tensors"], str(tmp)))
    text = json.dumps({"loader": rank_state["loader"], "rng": rng})
    _atomic(values, lambda tmp: tmp.write_text(text))


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
    engine, run_dir: Path, step: int, client_state: dict, rank_state: dict, keep_last: int
) -> Path:
    """Save on every rank (a collective); returns the checkpoint directory."""
    root = checkpoint_root(run_dir)
    tag = tag_for(step)
    rank, world = dist.get_rank(), dist.get_world_size()
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    _save_rank_state(root / tag, rank, rank_state)
    dist.barrier()
    if rank == 0:
        marker = {
            "step": step,
            "world_size": world,
            "zero_stage": engine.zero_optimization_stage(),
            "stage": client_state.get("stage"),
            "epoch": client_state.get("epoch"),
        }
        tmp = root / tag / (MARKER + ".tmp")
        tmp.write_text(json.dumps(marker, indent=2))
        os.replace(tmp, root / tag / MARKER)
        _prune(root, keep_last)
    dist.barrier()
    return root / tag


def _prune(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints (incomplete ones are removed at start-up
    by `remove_partial`)."""
    for old in complete_checkpoints(root.parent)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(engine, path: Path) -> tuple[dict, dict | None]:
    """Restore DeepSpeed states; returns (client_state, this rank's state or None).

    A different world size is refused for ZeRO stages >= 1 (partitioned optimizer states);
    ZeRO-0 states are whole, and the loader position does not depend on the world size.
    """
    marker = json.loads((path / MARKER).read_text())
    world = dist.get_world_size()
    stage = engine.zero_optimization_stage()
    if marker["world_size"] != world and (stage >= 1 or marker["zero_stage"] >= 1):
        raise ValueError(
            f"checkpoint {path} was written by {marker['world_size']} ranks with ZeRO stage "
            f"{marker['zero_stage']}; this run has {world} ranks (ZeRO stage {stage}). ZeRO "
            "partitions optimizer states by rank: resume with the same number of ranks, or "
            "convert it with DeepSpeed's ds_to_universal.py and load that universal checkpoint "
            "(not wired into this launcher)"
        )
    if marker["zero_stage"] != stage:
        raise ValueError(
            f"checkpoint {path} was written with ZeRO stage {marker['zero_stage']}; "
            f"this run uses stage {stage}: use the same DeepSpeed config"
        )
    check_torch_files(path)  # DeepSpeed's own loader unpickles everything: look first
    load_path, client = engine.load_checkpoint(
        str(path.parent), tag=path.name, load_optimizer_states=True, load_lr_scheduler_states=False
    )
    if load_path is None:
        raise ValueError(f"DeepSpeed could not load the checkpoint in {path}")
    rank_state = _load_rank_state(path, dist.get_rank()) if marker["world_size"] == world else None
    return client or {}, rank_state
