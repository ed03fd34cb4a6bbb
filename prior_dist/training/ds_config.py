"""Reading the DeepSpeed JSON: it decides micro-batch, accumulation, precision and ZeRO stage.

The recipe may state what it needs (`deepspeed_expect`, in DeepSpeed's own dotted keys); a JSON
that disagrees is refused before any process group starts. The optimizer section is written
here from the recipe (AdamW; the learning rate is set per step by the curriculum schedule).
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from prior_dist.schema import dotted
from prior_dist.training.recipe import Recipe

Precision = Literal["fp32", "bf16", "fp16"]
_AUTOCAST_DTYPES = {
    "bfloat16": "bf16",
    "bf16": "bf16",
    "torch.bfloat16": "bf16",
    "float16": "fp16",
    "fp16": "fp16",
    "torch.float16": "fp16",
}


@dataclass(frozen=True)
class DeepSpeedSettings:
    path: str
    raw: dict
    micro_batch_size: int
    gradient_accumulation_steps: int
    precision: Precision
    zero_stage: int
    offload_optimizer: bool
    # DeepSpeed's `torch_autocast`: fp32 parameters, the forward under torch.autocast at
    # `precision`; the optimizer is a plain (fused) AdamW with no mixed-precision wrapper.
    autocast: bool = False


def read_deepspeed_config(path: str | Path) -> DeepSpeedSettings:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config {path}: file not found")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a DeepSpeed config is a JSON object")
    micro = raw.get("train_micro_batch_size_per_gpu")
    if not isinstance(micro, int) or isinstance(micro, bool) or micro < 1:
        raise ValueError(
            f"{path}: train_micro_batch_size_per_gpu must be a positive integer, "
            f"got {micro!r} (train_batch_size alone is not accepted: the loader "
            "needs the per-rank micro-batch)"
        )
    gas = raw.get("gradient_accumulation_steps", 1)
    if not isinstance(gas, int) or isinstance(gas, bool) or gas < 1:
        raise ValueError(
            f"{path}: gradient_accumulation_steps must be a positive integer, got {gas!r}"
        )
    if "train_batch_size" in raw:
        raise ValueError(
            f"{path}: leave train_batch_size out; it follows from "
            "train_micro_batch_size_per_gpu x gradient_accumulation_steps x ranks"
        )
    raw = _resolve_auto_autocast(raw)
    fp16, bf16 = bool(dotted(raw, "fp16.enabled")), bool(dotted(raw, "bf16.enabled"))
    if fp16 and bf16:
        raise ValueError(f"{path}: fp16.enabled and bf16.enabled are both true; pick one")
    autocast = bool(dotted(raw, "torch_autocast.enabled"))
    if autocast:
        fp16, bf16 = _autocast_precision(path, raw, fp16, bf16)
    stage = dotted(raw, "zero_optimization.stage") or 0
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"{path}: zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    for owned in ("optimizer", "scheduler"):
        if owned in raw:
            raise ValueError(
                f"{path}: remove the {owned!r} section: the recipe's optim and "
                "train.stages sections define AdamW and the per-stage schedule"
            )
    offload = (dotted(raw, "zero_optimization.offload_optimizer.device") or "none") != "none"
    return DeepSpeedSettings(
        str(path),
        raw,
        micro,
        gas,
        "fp16" if fp16 else "bf16" if bf16 else "fp32",
        int(stage),
        offload,
        autocast,
    )


def _resolve_auto_autocast(raw: dict) -> dict:
    """`torch_autocast.enabled: "auto"` (ours, not DeepSpeed's): autocast where the device
    computes in that dtype natively (a CUDA GPU that supports it), fp32 elsewhere (a CPU's bf16
    matmul is several times slower than its fp32). Resolved in the dict that DeepSpeed and
    `config.resolved.json` see."""
    if dotted(raw, "torch_autocast.enabled") != "auto":
        return raw
    raw = copy.deepcopy(raw)
    raw["torch_autocast"]["enabled"] = bool(
        torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    )
    return raw


def _autocast_precision(path: Path, raw: dict, fp16: bool, bf16: bool) -> tuple[bool, bool]:
    """(fp16, bf16) of a `torch_autocast` section; refused beside bf16/fp16.enabled."""
    if fp16 or bf16:
        raise ValueError(
            f"{path}: torch_autocast.enabled with {'fp16' if fp16 else 'bf16'}.enabled: pick "
            "one (torch_autocast keeps fp32 parameters; bf16/fp16 cast them)"
        )
    dtype = dotted(raw, "torch_autocast.dtype") or "bfloat16"
    if dtype not in _AUTOCAST_DTYPES:
        raise ValueError(
            f"{path}: torch_autocast.dtype must be one of {sorted(_AUTOCAST_DTYPES)}, got {dtype!r}"
        )
    return _AUTOCAST_DTYPES[dtype] == "fp16", _AUTOCAST_DTYPES[dtype] == "bf16"


def check_against_recipe(ds: DeepSpeedSettings, recipe: Recipe, device_type: str) -> None:
    """Refuse contradictions between the JSON and the recipe, with both values named."""
    for key, expected in recipe.deepspeed_expect.items():
        actual = dotted(ds.raw, key)
        if actual != expected:
            raise ValueError(
                f"recipe {recipe.name!r} needs {key}={expected!r} but {ds.path} has "
                f"{actual!r}: use a DeepSpeed config that matches, or change the "
                "recipe's deepspeed_expect"
            )
    if ds.precision == "fp16" and device_type != "cuda":
        raise ValueError(f"{ds.path}: fp16 needs a CUDA device; on a CPU use fp32 or bf16")
    if ds.offload_optimizer and ds.zero_stage == 0:
        raise ValueError(f"{ds.path}: offload_optimizer needs zero_optimization.stage >= 1")
    if recipe.optim.impl == "deepspeed_fused" and device_type != "cuda":
        raise ValueError(
            "optim.impl=deepspeed_fused needs a CUDA device (DeepSpeed's FusedAdam is a CUDA "
            "op); on a CPU use auto, torch or torch_fused"
        )


def adamw_impl(ds: DeepSpeedSettings, recipe: Recipe) -> str:
    """The AdamW the engine builds: `optim.impl` with `auto` resolved to torch's fused AdamW
    (CUDA and CPU: one kernel over all parameters, no per-parameter Python loop, and it skips a
    step on the device when told that a gradient is not finite); with the optimizer
    offloaded, DeepSpeed's CPU Adam whatever was asked."""
    if ds.offload_optimizer:
        return "deepspeed_cpu"
    if recipe.optim.impl == "auto":
        return "torch_fused"
    return recipe.optim.impl


def engine_config(
    ds: DeepSpeedSettings, recipe: Recipe, device_type: str, load_universal: bool = False
) -> dict:
    """The dict handed to deepspeed.initialize: the user's JSON plus our optimizer section
    (and, to resume a ZeRO 1-3 checkpoint on another number of ranks, universal loading)."""
    config = copy.deepcopy(ds.raw)
    if load_universal:
        config["checkpoint"] = {**config.get("checkpoint", {}), "load_universal": True}
    params = {
        "lr": recipe.train.stages[0].lr,
        "betas": list(recipe.optim.betas),
        "eps": recipe.optim.eps,
        "weight_decay": recipe.optim.weight_decay,
    }
    impl = adamw_impl(ds, recipe)
    if impl in ("torch", "torch_fused"):
        params["torch_adam"] = True  # torch.optim.AdamW: nothing to compile
        if impl == "torch_fused":
            params["fused"] = True
    config["optimizer"] = {"type": "AdamW", "params": params}
    config.setdefault("steps_per_print", 10**9)  # we log ourselves
    config.setdefault("wall_clock_breakdown", False)
    # DeepSpeed's throughput timer synchronizes the device at every forward and step.
    config.setdefault("timers", {"throughput": {"enabled": False}})
    return config
