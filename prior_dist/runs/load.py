"""Load a trained PRIOR model from a run directory (its newest complete checkpoint) or from an
export directory (`python -m prior_dist.export`)."""

from __future__ import annotations

import json
import tempfile
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors.torch import load_file

from prior_dist.data.config import DataConfig
from prior_dist.data.run_data import first_local_source
from prior_dist.data.tokenize import build_wordpiece, load_tokenizer
from prior_dist.models import build_model
from prior_dist.models.config import ModelConfig, model_config
from prior_dist.models.prior import PriorModel
from prior_dist.models.state_dict import (
    join_from_export,
    load_hf_weights,
    prior_from_reference,
)
from prior_dist.runs.checkpoints import damaged_files, newest_intact
from prior_dist.runs.layout import (
    CARD_FILE,
    EVAL_RESULT,
    HEADS_FILE,
    IMAGE_FILE,
    MARKER,
    MODEL_STATES,
    RESOLVED_CONFIG,
    RUN_TOKENIZER,
    TEXT_DIR,
)
from prior_dist.runs.safe_load import check_torch_files, safe_torch_load
from prior_dist.schema import build, upgrade_moved_fields


@dataclass
class LoadedModel:
    model: PriorModel
    tokenizer: object
    source: str
    info: dict = field(default_factory=dict)  # steps, recipe, data, eval results

    @property
    def data_path(self) -> str | None:
        """Where the model's pretraining data is, as its run or model card says."""
        return self.info.get("data_path") or (self.info.get("data") or {}).get("path")


def _checkpoint_state(checkpoint: Path) -> dict:
    """The full fp32 module state of a DeepSpeed checkpoint: ZeRO-3 partitions merged, and under
    bf16/fp16 with ZeRO 1-3 the optimizer's fp32 master weights rather than the module's
    half-precision copies (which lose all but 8 or 11 bits of each trained weight)."""
    states = checkpoint / MODEL_STATES
    if not states.is_file():
        raise FileNotFoundError(f"{checkpoint}: no {MODEL_STATES}")
    marker = json.loads((checkpoint / MARKER).read_text())
    state = None if marker.get("zero_stage", 0) == 3 else safe_torch_load(states)["module"]
    half = state is not None and any(
        v.is_floating_point() and v.dtype != torch.float32 for v in state.values()
    )
    if state is None or (half and marker.get("zero_stage", 0) > 0):
        # deepspeed is heavy and needed only for the merge from the optimizer's partitions.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        check_torch_files(checkpoint)  # DeepSpeed's merge unpickles everything: look first
        state = get_fp32_state_dict_from_zero_checkpoint(
            str(checkpoint.parent), tag=checkpoint.name
        )
    return {k.removeprefix("model."): v for k, v in state.items()}


def load_run(run_dir: str | Path, checkpoint: str | Path | None = None) -> LoadedModel:
    run_dir = Path(run_dir)
    resolved_path = run_dir / RESOLVED_CONFIG
    if not resolved_path.is_file():
        raise FileNotFoundError(
            f"{run_dir}: no {RESOLVED_CONFIG} (not a pretraining run directory)"
        )
    resolved = json.loads(resolved_path.read_text())
    checkpoint = _intact_checkpoint(run_dir, checkpoint)
    cfg = ModelConfig.from_dict(resolved["model"], f"{resolved_path}: model")
    cfg = cfg.replace(
        text=replace(cfg.text, pretrained=None), image=replace(cfg.image, pretrained=None)
    )
    model = build_model(cfg)
    _load_strictly(model, _checkpoint_state(checkpoint), checkpoint)
    model.eval()
    data = _locate_data(
        build(
            DataConfig,
            upgrade_moved_fields(resolved["recipe"], warn=False)["data"],
            f"{resolved_path}: recipe.data",
        ),
        run_dir,
    )
    shards = first_local_source(data)
    tokenizer = _run_tokenizer(run_dir, data, shards)
    marker = json.loads((checkpoint / MARKER).read_text())
    info = {
        "run_dir": str(run_dir),
        "checkpoint": str(checkpoint),
        "step": marker["step"],
        "recipe": resolved["recipe"],
        "data_path": str(data.path),
        "shards": str(shards),
    }
    eval_file = run_dir / EVAL_RESULT
    if eval_file.is_file():
        info["eval"] = json.loads(eval_file.read_text())
    return LoadedModel(model, tokenizer, str(checkpoint), info)


def _intact_checkpoint(run_dir: Path, checkpoint: str | Path | None) -> Path:
    """The named checkpoint, refused when its files fail their records in complete.json; or the
    newest intact complete one, with a warning naming each damaged newer one."""
    if checkpoint is not None:
        problems = damaged_files(Path(checkpoint))
        if problems:
            raise ValueError(f"checkpoint {checkpoint} is damaged: " + "; ".join(problems))
        return Path(checkpoint)
    path, damaged = newest_intact(run_dir)
    for bad, problems in damaged:
        warnings.warn(f"checkpoint {bad} is damaged ({'; '.join(problems)}); skipped", stacklevel=3)
    if path is None and damaged:
        raise ValueError(f"{run_dir}: every complete checkpoint is damaged")
    if path is None:
        raise FileNotFoundError(f"{run_dir}: no complete checkpoint")
    return path


def _locate_data(data: DataConfig, run_dir: Path) -> DataConfig:
    """The run's data paths, absolute. Runs store them absolute; older runs stored them
    relative to wherever training ran, so look from here, the run directory and its parents
    (the first place that holds the first source's manifest wins)."""
    for base in (Path.cwd(), run_dir, *run_dir.resolve().parents):
        anchored = data.anchored(base)
        if (first_local_source(anchored) / "manifest.json").is_file():
            return anchored
    return data.anchored(Path.cwd())


def _run_tokenizer(run_dir: Path, data: DataConfig, shards: Path):
    """The tokenizer the run saved; for older runs the shards' WordPiece vocabulary or the
    configured tokenizer. Nothing is written: a missing vocabulary is rebuilt in a temporary
    directory (the same words, from the same shards)."""
    if (run_dir / RUN_TOKENIZER).is_dir():
        return load_tokenizer(str(run_dir / RUN_TOKENIZER))
    if data.tokenizer != "auto":
        return load_tokenizer(data.tokenizer)
    if (shards / "wordpiece" / "vocab.txt").is_file():
        return load_tokenizer(str(shards / "wordpiece"))
    if not (shards / "manifest.json").is_file():
        raise FileNotFoundError(
            f"{run_dir}: no saved tokenizer, and the run's shards {shards} (data.path in "
            f"{RESOLVED_CONFIG}) are not there to rebuild it from; pass the data location"
        )
    with tempfile.TemporaryDirectory() as tmp:
        return build_wordpiece(shards, Path(tmp) / "wordpiece", vocab_size=data.vocab_size)


def load_export(export_dir: str | Path) -> LoadedModel:
    export_dir = Path(export_dir)
    card = json.loads((export_dir / CARD_FILE).read_text())
    cfg = ModelConfig.from_dict(card["model_config"], f"{export_dir / CARD_FILE}: model_config")
    model = build_model(cfg)
    state = join_from_export(
        load_file(str(export_dir / IMAGE_FILE)),
        load_hf_weights(str(export_dir / TEXT_DIR)),
        load_file(str(export_dir / HEADS_FILE)),
        cfg,
    )
    _load_strictly(model, state, export_dir)
    model.eval()
    # transformers takes about a second to import; only an export's tokenizer needs it here.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(export_dir / TEXT_DIR))
    return LoadedModel(model, tokenizer, str(export_dir), card)


def load_reference(
    path: str | Path, tokenizer: str | None, base: ModelConfig | None = None
) -> LoadedModel:
    """The authors' released PRIOR checkpoint (their Lightning `.ckpt`, whose `state_dict`
    holds their `Prior` module, or that state dict saved alone) as our `paper` model in the
    reference layout (`--compat reference`), loaded strictly. Read with a weights-only load:
    a file that needs more is refused and nothing in it runs. `tokenizer`: a local directory
    of the tokenizer it was trained with (Bio_ClinicalBERT's), which the file does not hold.
    `base`: another model size in the reference layout (tests use `tiny`)."""
    path = Path(path)
    ours = _reference_state(path)
    cfg = base or model_config("paper", "reference")
    vocab = ours.get("text.bert.word_embeddings.weight")
    if vocab is not None:
        cfg = cfg.for_vocabulary(vocab.shape[0])
    cfg = cfg.replace(
        text=replace(cfg.text, pretrained=None), image=replace(cfg.image, pretrained=None)
    )
    model = build_model(cfg)
    _load_strictly(model, ours, path)
    model.eval()
    if tokenizer is None:
        raise ValueError(
            f"{path}: the authors' checkpoint holds no tokenizer; pass --tokenizer DIR (a local "
            "copy of emilyalsentzer/Bio_ClinicalBERT's tokenizer, which it was trained with)"
        )
    info = {"checkpoint": str(path), "source": "authors' PRIOR checkpoint", "compat": "reference"}
    return LoadedModel(model, load_tokenizer(tokenizer), str(path), info)


def _reference_state(path: Path) -> dict:
    """The authors' file (a Lightning checkpoint or its `state_dict` alone), read weights-only,
    in our reference-layout names; a ValueError naming the file otherwise."""
    raw = safe_torch_load(path)
    state = raw.get("state_dict", raw) if isinstance(raw, dict) else None
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise ValueError(f"{path}: not a state dict or a Lightning checkpoint with `state_dict`")
    try:
        return prior_from_reference(state)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


def _load_strictly(model, state: dict, path: Path) -> None:
    """Every parameter present with its shape, nothing extra: else a ValueError naming keys."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: {tuple(state[k].shape)} in the file, {tuple(v.shape)} here"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = [
        f"{label}: {names[:5]}{' ...' if len(names) > 5 else ''}"
        for label, names in (("missing", missing), ("unexpected", extra), ("mis-shaped", shapes))
        if names
    ]
    if problems:
        raise ValueError(
            f"{path}: does not fit the model it is loaded into; " + "; ".join(problems)
        )
    model.load_state_dict(state, strict=True)


def initial_weights(model, path: str | Path) -> str:
    """Load `init_from` into `model`, strictly: a run or checkpoint directory, an export
    directory, or the authors' released checkpoint file. Returns a one-line report."""
    path = Path(path)
    if path.is_file():
        state = _reference_state(path)
        kind = "the authors' checkpoint"
    elif (
        (path / CARD_FILE).is_file()
        or (path / RESOLVED_CONFIG).is_file()
        or (path / MARKER).is_file()
    ):
        state = load_model(path).model.state_dict()
        kind = "an export" if (path / CARD_FILE).is_file() else "a run checkpoint"
    else:
        raise FileNotFoundError(
            f"init_from {path}: not a run, checkpoint or export directory, nor a file"
        )
    _load_strictly(model, state, path)
    return f"init_from {path} ({kind}): all {len(state)} tensors loaded, strict"


def load_model(path: str | Path, tokenizer: str | None = None) -> LoadedModel:
    """A run directory, an export directory, or (a file) the authors' released checkpoint, told
    apart by what it holds."""
    path = Path(path)
    if path.is_file():
        return load_reference(path, tokenizer)
    if (path / CARD_FILE).is_file():
        return load_export(path)
    if (path / RESOLVED_CONFIG).is_file():
        return load_run(path)
    if (path / MARKER).is_file():
        return load_run(path.parent.parent, path)
    raise FileNotFoundError(
        f"{path}: neither a run directory (config.resolved.json), a "
        "checkpoint (complete.json) nor an export (model_card.json)"
    )
