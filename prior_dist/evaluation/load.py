"""Load a trained PRIOR model from a run directory (its newest complete checkpoint) or from an
export directory (`python -m prior_dist.export`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from prior_dist.models import build_model
from prior_dist.models.config import ModelConfig
from prior_dist.models.prior import PriorModel


@dataclass
class LoadedModel:
    model: PriorModel
    tokenizer: object
    source: str
    info: dict = field(default_factory=dict)   # steps, recipe, data, eval results


def _checkpoint_state(checkpoint: Path) -> dict:
    """The full module state of a DeepSpeed checkpoint (ZeRO-3 partitions are merged)."""
    states = checkpoint / "mp_rank_00_model_states.pt"
    if not states.is_file():
        raise FileNotFoundError(f"{checkpoint}: no mp_rank_00_model_states.pt")
    marker = json.loads((checkpoint / "complete.json").read_text())
    if marker.get("zero_stage", 0) == 3:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent),
                                                         tag=checkpoint.name)
    else:
        state = torch.load(states, map_location="cpu", weights_only=False)["module"]
    return {k.removeprefix("model."): v for k, v in state.items()}


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None) -> LoadedModel:
    from prior_dist.data.loader import parse_sources
    from prior_dist.training.checkpoint import complete_checkpoints
    from prior_dist.training.data import data_sources, load_training_tokenizer
    from prior_dist.training.recipe import DataConfig

    run_dir = Path(run_dir)
    resolved_path = run_dir / "config.resolved.json"
    if not resolved_path.is_file():
        raise FileNotFoundError(f"{run_dir}: no config.resolved.json (not a pretraining run "
                                "directory)")
    resolved = json.loads(resolved_path.read_text())
    if checkpoint is None:
        found = complete_checkpoints(run_dir)
        if not found:
            raise FileNotFoundError(f"{run_dir}: no complete checkpoint")
        checkpoint = found[-1]
    checkpoint = Path(checkpoint)
    cfg = ModelConfig.from_dict(resolved["model"])
    cfg = cfg.replace(text=replace(cfg.text, pretrained=None),
                      image=replace(cfg.image, pretrained=None))
    model = build_model(cfg)
    model.load_state_dict(_checkpoint_state(checkpoint), strict=True)
    model.eval()
    data_raw = dict(resolved["recipe"]["data"])
    data = DataConfig(**data_raw)
    shards = Path(next(s.location for s in parse_sources(data_sources(data)) if not s.remote))
    tokenizer = load_training_tokenizer(data, shards)
    marker = json.loads((checkpoint / "complete.json").read_text())
    info = {"run_dir": str(run_dir), "checkpoint": str(checkpoint), "step": marker["step"],
            "recipe": resolved["recipe"], "data_path": str(data.path), "shards": str(shards)}
    eval_file = run_dir / "eval.json"
    if eval_file.is_file():
        info["eval"] = json.loads(eval_file.read_text())
    return LoadedModel(model, tokenizer, str(checkpoint), info)


def load_export(export_dir: str | Path) -> LoadedModel:
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from prior_dist.export import import_state_dict

    export_dir = Path(export_dir)
    card = json.loads((export_dir / "model_card.json").read_text())
    cfg = ModelConfig.from_dict(card["model_config"])
    model = build_model(cfg)
    state = import_state_dict(export_dir, load_file)
    model.load_state_dict(state, strict=True)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(export_dir / "text_encoder"))
    return LoadedModel(model, tokenizer, str(export_dir), card)


def load_model(path: str | Path) -> LoadedModel:
    """A run directory or an export directory, told apart by what it holds."""
    path = Path(path)
    if (path / "model_card.json").is_file():
        return load_export(path)
    if (path / "config.resolved.json").is_file():
        return load_run(path)
    if (path / "complete.json").is_file():
        return load_run(path.parent.parent, path)
    raise FileNotFoundError(f"{path}: neither a run directory (config.resolved.json), a "
                            "checkpoint (complete.json) nor an export (model_card.json)")
