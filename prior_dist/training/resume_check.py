"""What a resumed run may change: the saved recipe against the current one, field by field.

A resumed run continues the saved one's training, so fields that change what is trained (the
model, the data, the tokenizer, the seed, the optimizer, the curriculum) must match; fields
that change how it is run (logging, evaluation, checkpoint cadence, loader workers, batch
padding, compilation, activation checkpointing, attention kernels) may change and are listed.
"""

from __future__ import annotations

from typing import Any

# Dotted recipe fields (or prefixes ending in ".") that a resume may change.
SAFE_TO_CHANGE = (
    "name",
    "init_from",  # only the first start reads it
    "deepspeed_expect",
    "logging.",
    "eval.",
    "checkpoint.",
    "data.workers",
    "data.token_bucket",
    "data.sentence_bucket",
    "train.max_nonfinite_steps",
    "train.collective_timeout_s",
    "train.compile",
    "train.activation_checkpointing",
    "model.image.activation_checkpointing",
    "model.text.activation_checkpointing",
    "model.image.attention_impl",
    "model.text.attention_impl",
    "model.heads.local_attention_impl",
)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """`{"a": {"b": [1, 2]}}` -> `{"a.b.0": 1, "a.b.1": 2}`."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    else:
        return {prefix.rstrip("."): value}
    out: dict[str, Any] = {}
    for key, item in items:
        out.update(flatten(item, f"{prefix}{key}."))
    return out


def _safe(key: str) -> bool:
    return any(key == s or (s.endswith(".") and key.startswith(s)) for s in SAFE_TO_CHANGE)


def compare_recipes(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """(refused changes, allowed changes), each as `field: saved -> now` lines."""
    old, new = flatten(saved), flatten(current)
    refused, allowed = [], []
    for key in sorted(old.keys() | new.keys()):
        before, after = old.get(key, "(absent)"), new.get(key, "(absent)")
        if before == after:
            continue
        line = f"{key}: {before!r} -> {after!r}"
        (allowed if _safe(key) else refused).append(line)
    return refused, allowed


def refusal(run_dir, refused: list[str]) -> str:
    listed = "\n  ".join(refused)
    return (
        f"resuming {run_dir} would change what its run trains ({len(refused)} field(s), saved "
        f"-> now):\n  {listed}\nResume with the saved values, or train a new run: another "
        "--run-dir (or --resume none to start over here)"
    )
