"""Run recipes: typed, validated sections composed into `Recipe`, loaded from YAML.

Named recipes live in `prior_dist/configs/recipes/{paper,demo,tiny}.yaml`; `--set
section.field=value` overrides any field (values parsed as YAML, list items by index:
`train.stages.0.epochs=2`).
Micro-batch, accumulation, precision and ZeRO stage belong to the DeepSpeed JSON, never here.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prior_dist.data.config import DataConfig
from prior_dist.data.labels import CHEXPERT_COMPETITION
from prior_dist.models.config import ModelConfig, model_config
from prior_dist.task.curriculum import LOSS_NAMES

# Shipped inside the package (a wheel has them too); `configs/` in a checkout links here.
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
RECIPE_DIR = CONFIG_DIR / "recipes"


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True)
class StageConfig:
    """One curriculum stage: its length (epochs or steps) and its warm-up + cosine schedule."""

    epochs: float | None = None
    steps: int | None = None
    lr: float = 1e-5
    warmup_start_lr: float = 1e-7
    warmup_epochs: float | None = None
    warmup_steps: int | None = None
    # Loss name -> weight for this stage (null: the spec's weights for the stage); a loss left
    # out or weighted 0 does not run.
    loss_weights: dict[str, float] | None = None

    def __post_init__(self) -> None:
        if self.loss_weights is not None:
            _require(
                isinstance(self.loss_weights, dict),
                f"train.stages: loss_weights must map loss names to weights, got "
                f"{self.loss_weights!r}",
            )
            unknown = sorted(set(self.loss_weights) - set(LOSS_NAMES))
            _require(
                not unknown,
                f"train.stages: loss_weights: unknown loss name(s) {unknown}; "
                f"allowed: {list(LOSS_NAMES)}",
            )
            object.__setattr__(
                self, "loss_weights", {k: float(v) for k, v in self.loss_weights.items()}
            )
        _require(
            (self.epochs is None) != (self.steps is None),
            f"train.stages: give exactly one of epochs or steps per stage, got "
            f"epochs={self.epochs} steps={self.steps}",
        )
        _require(
            (self.epochs or 0) >= 0 and (self.steps or 0) >= 0,
            "train.stages: epochs and steps must be >= 0",
        )
        _require(
            not (self.warmup_epochs is not None and self.warmup_steps is not None),
            "train.stages: give at most one of warmup_epochs or warmup_steps",
        )
        _require(
            self.lr > 0 and self.warmup_start_lr >= 0,
            f"train.stages: lr must be > 0 and warmup_start_lr >= 0, got lr={self.lr} "
            f"warmup_start_lr={self.warmup_start_lr}",
        )


ADAMW_IMPLS = ("auto", "torch", "torch_fused", "deepspeed_fused")


@dataclass(frozen=True)
class OptimConfig:
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-6
    # AdamW implementation. auto: torch's fused AdamW on CUDA (nothing to compile), torch's
    # multi-tensor AdamW on a CPU; torch | torch_fused | deepspeed_fused (DeepSpeed's FusedAdam,
    # compiled with nvcc at the first run).
    impl: str = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))
        _require(
            self.impl in ADAMW_IMPLS,
            f"optim.impl must be one of {list(ADAMW_IMPLS)}, got {self.impl!r}",
        )
        _require(
            len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
            f"optim.betas must be two numbers in [0, 1), got {self.betas}",
        )
        _require(
            self.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {self.weight_decay}"
        )


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 114514
    stages: tuple[StageConfig, ...] = field(
        default_factory=lambda: (
            StageConfig(epochs=20, lr=1e-5, warmup_start_lr=1e-7, warmup_epochs=1),
            StageConfig(epochs=30, lr=1e-5, warmup_start_lr=1e-7, warmup_epochs=1),
            StageConfig(epochs=100, lr=5e-6, warmup_start_lr=1e-8, warmup_epochs=5),
        )
    )
    sentence_cap: int = 16
    # Losses are computed from sample-tied randomness (Gumbel noise per sentence from the
    # sample's seed), so results do not depend on how many ranks share a batch.
    tie_noise_to_samples: bool = True
    sync_batchnorm: bool = True
    # Shorthand for model.image/text.activation_checkpointing=true, resolved into the model
    # config when the recipe is built.
    activation_checkpointing: bool = False
    max_nonfinite_steps: int = 5
    collective_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        stages = tuple(
            s
            if isinstance(s, StageConfig)
            else StageConfig(**_fields(StageConfig, s, f"train.stages.{i}"))
            for i, s in enumerate(self.stages)
        )
        object.__setattr__(self, "stages", stages)
        _require(
            len(stages) == 3, f"train.stages must list the 3 curriculum stages, got {len(stages)}"
        )
        _require(
            self.sentence_cap >= 1, f"train.sentence_cap must be >= 1, got {self.sentence_cap}"
        )
        _require(
            self.max_nonfinite_steps >= 1,
            f"train.max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}",
        )
        _require(self.collective_timeout_s > 0, "train.collective_timeout_s must be > 0")


@dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int | None = 1000
    every_minutes: float | None = 30.0
    keep_last: int = 3

    def __post_init__(self) -> None:
        _require(
            self.every_steps is None or self.every_steps >= 1,
            f"checkpoint.every_steps must be >= 1 or null, got {self.every_steps}",
        )
        _require(
            self.every_minutes is None or self.every_minutes > 0,
            f"checkpoint.every_minutes must be > 0 or null, got {self.every_minutes}",
        )
        _require(self.keep_last >= 1, f"checkpoint.keep_last must be >= 1, got {self.keep_last}")


# logging.report_to names beside "jsonl" (metrics.jsonl, always written) -> the module each needs.
REPORTERS = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb"}


@dataclass(frozen=True)
class LoggingConfig:
    progress: bool = True
    # Where rank 0 reports every step's record besides RUN_DIR/metrics.jsonl (always written):
    # tensorboard (RUN_DIR/tensorboard/), wandb (Weights & Biases; WANDB_MODE=offline keeps
    # it on disk under RUN_DIR/wandb/), each with the resolved config as the run's config.
    report_to: tuple[str, ...] = ()
    wandb_project: str = "prior_dist"
    # [first, last]: optimizer steps (1-based, inclusive) profiled on rank 0 with
    # torch.profiler into RUN_DIR/profile/ (ops.txt, trace.json); null: off.
    profile_steps: tuple[int, int] | None = None
    # Warn (rank 0, at most once per window) when the loader's share of the step time over the
    # last `data_wait_window` steps exceeds `data_wait_warn` (null: never).
    data_wait_warn: float | None = 0.10
    data_wait_window: int = 50

    def __post_init__(self) -> None:
        _require(
            self.data_wait_window >= 1,
            f"logging.data_wait_window must be >= 1, got {self.data_wait_window}",
        )
        if self.profile_steps is not None:
            steps = tuple(self.profile_steps)
            _require(
                len(steps) == 2 and 1 <= steps[0] <= steps[1],
                f"logging.profile_steps must be [first, last] with 1 <= first <= last, "
                f"got {list(steps)}",
            )
        unknown = sorted(set(self.report_to) - {"jsonl", *REPORTERS})
        _require(
            not unknown,
            f"logging.report_to: unknown {unknown}; allowed: {['jsonl', *REPORTERS]} "
            "(metrics.jsonl is always written)",
        )
        for name in set(self.report_to) & set(REPORTERS):
            try:
                # Optional packages: checked here so a recipe asking for one fails before start.
                importlib.import_module(REPORTERS[name])
            except ImportError as err:
                raise ValueError(
                    f"logging.report_to: {name} needs the {name} package "
                    f"(pip install {name}): {err}"
                ) from err


@dataclass(frozen=True)
class EvalConfig:
    zero_shot: bool = True
    classes: tuple[str, ...] = CHEXPERT_COMPETITION
    prompt: str = "{} is observed"
    local_weight: float = 0.5
    # Images per forward pass of the periodic and end-of-run evaluation.
    micro_batch_size: int = 32
    # During pretraining: zero-shot accuracy and retrieval recall on this split every N
    # optimizer steps, logged with that step in metrics.jsonl (null: off).
    every_steps: int | None = None
    split: str = "validate"

    def __post_init__(self) -> None:
        _require(
            self.every_steps is None or self.every_steps >= 1,
            f"eval.every_steps must be >= 1 or null, got {self.every_steps}",
        )
        _require(
            self.micro_batch_size >= 1,
            f"eval.micro_batch_size must be >= 1, got {self.micro_batch_size}",
        )
        object.__setattr__(self, "classes", tuple(self.classes))
        _require(len(self.classes) >= 2, "eval.classes must name at least 2 classes")
        _require("{}" in self.prompt, f"eval.prompt must contain '{{}}', got {self.prompt!r}")


@dataclass(frozen=True)
class Recipe:
    name: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # DeepSpeed keys (dotted) and the values this recipe needs; a JSON that disagrees is refused.
    deepspeed_expect: dict[str, Any] = field(default_factory=dict)
    # `model.init_from`: start from these weights (a run or checkpoint directory, an export, or
    # the authors' released checkpoint file), loaded strictly before training.
    init_from: str | None = None

    def __post_init__(self) -> None:
        if self.train.activation_checkpointing:
            image = dataclasses.replace(self.model.image, activation_checkpointing=True)
            text = dataclasses.replace(self.model.text, activation_checkpointing=True)
            object.__setattr__(self, "model", self.model.replace(image=image, text=text))

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def stage_weights(self) -> dict[int, dict[str, float]]:
        """`stage_plan`'s overrides: the stages whose `loss_weights` the recipe sets."""
        return {
            i + 1: dict(s.loss_weights)
            for i, s in enumerate(self.train.stages)
            if s.loss_weights is not None
        }


_SCALARS = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}
_FLOAT_TEXT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _coerce(name: str, annotation: str, value, where: str):
    """Check a scalar field against its annotation (`float | None` and the like)."""
    parts = [p.strip() for p in str(annotation).split("|")]
    if value is None:
        if "None" in parts:
            return None
        raise ValueError(f"{where}.{name} must not be null")
    sequence = _SEQUENCE.match(parts[0])
    if sequence and parts[1:] in ([], ["None"]):
        return _coerce_sequence(name, sequence, value, where)
    kinds = [_SCALARS[p] for p in parts if p in _SCALARS]
    if not kinds or len(kinds) + ("None" in parts) != len(parts):
        return value  # mappings, nested sections and literals: checked by the dataclass
    if "float" in parts and isinstance(value, str) and _FLOAT_TEXT.match(value.strip()):
        value = float(value)  # YAML 1.1 reads 1e-6 (no dot) as a string
    allowed = tuple(t for kind in kinds for t in kind)
    if isinstance(value, bool) and bool not in allowed:
        allowed = ()
    if not isinstance(value, allowed):
        names = " or ".join(parts)
        raise ValueError(f"{where}.{name} must be {names}, got {value!r}")
    return float(value) if parts[0] == "float" and not isinstance(value, bool) else value


_SEQUENCE = re.compile(r"^(tuple|list)\[(int|float|str)(?:, (int|float|str))?(, \.\.\.)?\]$")


def _coerce_sequence(name: str, match: re.Match, value, where: str) -> tuple | list:
    """`tuple[float, float]`, `tuple[str, ...]` and the like: a YAML list of the right length
    whose items have the right type (a bare string is refused, not split into characters)."""
    kind, first, second, open_ended = match.groups()
    example = "[a, b]" if first == "str" else "[1, 2]"
    if not isinstance(value, (list, tuple)):
        raise ValueError(
            f"{where}.{name} must be a list, got {value!r} (on the command line: --set "
            f"'{where}.{name}={example}')"
        )
    if not open_ended and len(value) != (2 if second else 1):
        raise ValueError(f"{where}.{name} must have {2 if second else 1} items, got {value!r}")
    items = [_coerce(f"{name}[{i}]", first, v, where) for i, v in enumerate(value)]
    return tuple(items) if kind == "tuple" else items


def _fields(kind, values, where: str) -> dict:
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be a mapping, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(kind)}
    unknown = set(values) - set(fields)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)}; allowed: {sorted(fields)}")
    return {k: _coerce(k, fields[k].type, v, where) for k, v in values.items()}


SECTIONS = {
    "data": DataConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
    "eval": EvalConfig,
}


def recipe_from_dict(raw: dict) -> Recipe:
    """Build and validate a recipe; the `model` section is `{name: <named config>, image: ...}`."""
    allowed = set(SECTIONS) | {"name", "model", "deepspeed_expect"}
    unknown = set(raw) - allowed
    if unknown:
        raise ValueError(
            f"recipe: unknown section(s) {sorted(unknown)}; allowed: {sorted(allowed)}"
        )
    model_raw = dict(raw.get("model") or {})
    base = model_config(model_raw.pop("name", "paper"), model_raw.pop("compat_preset", "default"))
    init_from = model_raw.pop("init_from", None)
    if init_from is not None and not isinstance(init_from, str):
        raise ValueError(f"model.init_from must be a path or null, got {init_from!r}")
    merged = base.to_dict()
    for section, values in model_raw.items():
        if section not in merged:
            raise ValueError(
                f"model: unknown section {section!r}; allowed: name, "
                f"compat_preset, init_from, {', '.join(merged)}"
            )
        merged[section].update(_fields(type(getattr(base, section)), values, f"model.{section}"))
    parts = {
        name: kind(**_fields(kind, raw.get(name) or {}, name)) for name, kind in SECTIONS.items()
    }
    expect = raw.get("deepspeed_expect") or {}
    if not isinstance(expect, dict):
        raise ValueError("deepspeed_expect must map DeepSpeed keys to values")
    return Recipe(
        name=str(raw.get("name", "custom")),
        model=ModelConfig.from_dict(merged),
        deepspeed_expect=dict(expect),
        init_from=init_from,
        **parts,
    )


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`section.field=value` assignments on the raw recipe dict (YAML-parsed values)."""
    raw = json.loads(json.dumps(raw))
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected section.field=value")
        path, text = item.split("=", 1)
        keys = path.strip().split(".")
        if len(keys) < 2:
            raise ValueError(f"--set {item!r}: name a section and a field (section.field=value)")
        value = yaml.safe_load(text)
        node = raw
        for key in keys[:-1]:
            if isinstance(node, list):
                if not key.isdigit() or int(key) >= len(node):
                    raise ValueError(
                        f"--set {item!r}: {key!r} is not an index into a list of {len(node)}"
                    )
                node = node[int(key)]
            else:
                node = node.setdefault(key, {})
                if not isinstance(node, (dict, list)):
                    raise ValueError(f"--set {item!r}: {key!r} is a value, not a section")
        last = keys[-1]
        if isinstance(node, list):
            if not last.isdigit() or int(last) >= len(node):
                raise ValueError(
                    f"--set {item!r}: {last!r} is not an index into a list of {len(node)}"
                )
            node[int(last)] = value
        else:
            node[last] = value
    return raw


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> tuple[Recipe, dict]:
    """(recipe, raw dict) from a named recipe or a YAML path, with `--set` overrides applied."""
    path = Path(name_or_path)
    if not path.suffix:
        path = RECIPE_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            names = sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))
            raise ValueError(
                f"--recipe {name_or_path!r}: no such recipe; named recipes: {names}, "
                "or a path to a .yaml file"
            )
    if not path.is_file():
        raise ValueError(f"--recipe {name_or_path}: file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a recipe is a mapping of sections")
    raw.setdefault("name", path.stem)
    raw = apply_overrides(raw, overrides or [])
    return recipe_from_dict(raw), raw
