"""The names of what a run directory and an export directory hold (one place for both sides).

RUN_DIR/
  config.resolved.json      the recipe, model and DeepSpeed config the run used
  metrics.jsonl             one record per optimizer step
  eval.json                 end-of-run zero-shot result
  PREEMPTED                 present (holding the step) after a signal stopped the run
  LOCK                      while a run trains here: its owner (`runs/lock.py`)
  pids/rank{R}.pid
  tokenizer/                the tokenizer the run trained with (written by rank 0 at start;
                            built here when the shards are read-only and carry none)
  checkpoints/step{N:08d}/  DeepSpeed's files, rank{R:05d}.json + .safetensors, complete.json
                            (written last: step, world size, every file's size and SHA-256)
  checkpoints/step{N:08d}/.writer-rank{R}.json  while a detached writer (a stop checkpoint,
                            `runs/detached.py`) completes the checkpoint; .failed-rank{R}.txt
                            if it could not
  checkpoints/step{N:08d}/universal/  the same checkpoint in DeepSpeed's universal form
                            (optimizer states by parameter, not by rank), converted once by
                            the first resume on another number of ranks (ZeRO 1-3)
  checkpoints/damaged-step{N:08d}/  a complete checkpoint whose files failed that check, set
                            aside by `--resume auto` when it fell back to an earlier one
EXPORT_DIR/
  image_encoder.safetensors, heads.safetensors, text_encoder/, model_card.json, README.md
"""

from __future__ import annotations

from pathlib import Path

RESOLVED_CONFIG = "config.resolved.json"
METRICS = "metrics.jsonl"
EVAL_RESULT = "eval.json"
PREEMPTED = "PREEMPTED"
LOCK = "LOCK"
PIDS = "pids"
RUN_TOKENIZER = "tokenizer"
CHECKPOINTS = "checkpoints"
MARKER = "complete.json"
MODEL_STATES = "mp_rank_00_model_states.pt"
UNIVERSAL = "universal"

IMAGE_FILE = "image_encoder.safetensors"
HEADS_FILE = "heads.safetensors"
TEXT_DIR = "text_encoder"
CARD_FILE = "model_card.json"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


TAG_PREFIX = "step"
DAMAGED_PREFIX = "damaged-"


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def rank_files(checkpoint: Path, rank: int) -> tuple[Path, Path]:
    """This rank's loader position and RNG states inside a checkpoint directory: plain values
    as JSON, RNG tensors as safetensors (neither can carry code)."""
    stem = checkpoint / f"rank{rank:05d}"
    return stem.with_suffix(".json"), stem.with_suffix(".safetensors")


def legacy_rank_file(checkpoint: Path, rank: int) -> Path:
    """The same state as a torch file, in checkpoints written before 2026-12-02."""
    return checkpoint / f"rank{rank:05d}.pt"


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return sorted(
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(TAG_PREFIX) and (p / MARKER).is_file()
    )
