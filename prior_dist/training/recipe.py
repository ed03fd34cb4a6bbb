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
import typing
from dataclasses import field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from pydantic.dataclasses import dataclass

from prior_dist.data.config import DataConfig
from prior_dist.data.labels import CHEXPERT_COMPETITION
from prior_dist.evaluation.zero_shot import DEFAULT_PROMPT
from prior_dist.models.config import ModelConfig, model_config
from prior_dist.schema import SECTION, Probability, build, upgrade_moved_fields
from prior_dist.task.curriculum import LOSS_NAMES

# Shipped inside the package (a wheel has them too); `configs/` in a checkout links here.
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
RECIPE_DIR = CONFIG_DIR / "recipes"


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


@dataclass(frozen=True, config=SECTION)
class StageConfig:
    """One curriculum stage: its length (epochs or steps) and its warm-up + cosine schedule."""

    epochs: NonNegativeFloat | None = None
    steps: NonNegativeInt | None = None
    lr: PositiveFloat = 1e-5
    warmup_start_lr: NonNegativeFloat = 1e-7
    warmup_epochs: NonNegativeFloat | None = None
    warmup_steps: NonNegativeInt | None = None
    # Loss name -> weight for this stage (null: the spec's weights for the stage); a loss left
    # out or weighted 0 does not run.
    loss_weights: dict[str, float] | None = None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.loss_weights or {}) - set(LOSS_NAMES))
        _require(
            not unknown,
            f"train.stages: loss_weights: unknown loss name(s) {unknown}; "
            f"allowed: {list(LOSS_NAMES)}",
        )
        _require(
            (self.epochs is None) != (self.steps is None),
            f"train.stages: give exactly one of epochs or steps per stage, got "
            f"epochs={self.epochs} steps={self.steps}",
        )
        _require(
            not (self.warmup_epochs is not None and self.warmup_steps is not None),
            "train.stages: give at most one of warmup_epochs or warmup_steps",
        )


# AdamW implementation. auto: torch's fused AdamW on CUDA (nothing to compile), torch's
# multi-tensor AdamW on a CPU; torch | torch_fused | deepspeed_fused (DeepSpeed's FusedAdam,
# compiled with nvcc at the first run).
AdamWImpl = Literal["auto", "torch", "torch_fused", "deepspeed_fused"]
ADAMW_IMPLS = typing.get_args(AdamWImpl)


@dataclass(frozen=True, config=SECTION)
class OptimConfig:
    betas: Annotated[tuple[Probability, ...], Field(min_length=2, max_length=2)] = (0.9, 0.999)
    eps: PositiveFloat = 1e-8
    weight_decay: NonNegativeFloat = 1e-6
    impl: AdamWImpl = "auto"


def _paper_stages() -> tuple[StageConfig, ...]:
    return (
        StageConfig(epochs=20, lr=1e-5, warmup_start_lr=1e-7, warmup_epochs=1),
        StageConfig(epochs=30, lr=1e-5, warmup_start_lr=1e-7, warmup_epochs=1),
        StageConfig(epochs=100, lr=5e-6, warmup_start_lr=1e-8, warmup_epochs=5),
    )


@dataclass(frozen=True, config=SECTION)
class TrainConfig:
    seed: int = 114514
    # The 3 curriculum stages, in order.
    stages: Annotated[tuple[StageConfig, ...], Field(min_length=3, max_length=3)] = field(
        default_factory=_paper_stages
    )
    sentence_cap: PositiveInt = 16
    # Losses are computed from sample-tied randomness (Gumbel noise per sentence from the
    # sample's seed), so results do not depend on how many ranks share a batch.
    tie_noise_to_samples: bool = True
    sync_batchnorm: bool = True
    # Shorthand for model.image/text.activation_checkpointing=true, resolved into the model
    # config when the recipe is built.
    activation_checkpointing: bool = False
    max_nonfinite_steps: PositiveInt = 5
    # torch.compile the towers and heads (fixed shapes: see data.token_bucket). auto: on CUDA
    # under ZeRO 0-2; true also on a CPU (inductor); ZeRO-3 refuses true.
    compile: bool | Literal["auto"] = "auto"
    collective_timeout_s: PositiveFloat = 300.0


@dataclass(frozen=True, config=SECTION)
class CheckpointConfig:
    every_steps: PositiveInt | None = 1000
    every_minutes: PositiveFloat | None = 30.0
    keep_last: PositiveInt = 3


# logging.report_to names beside "jsonl" (metrics.jsonl, always written) -> the module each needs.
REPORTERS = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb"}


@dataclass(frozen=True, config=SECTION)
class LoggingConfig:
    progress: bool = True
    # Steps between reads of the losses from the device: each read is one stacked transfer
    # (and one all-reduce on several ranks) that waits for the device, so the host can queue
    # steps ahead in between. Every step still gets its record in metrics.jsonl, written at the
    # read; per-step times within a window are the host's, their mean is the device's.
    every: PositiveInt = 10
    # Where rank 0 reports every step's record besides RUN_DIR/metrics.jsonl (always written):
    # tensorboard (RUN_DIR/tensorboard/), wandb (Weights & Biases; WANDB_MODE=offline keeps
    # it on disk under RUN_DIR/wandb/), each with the resolved config as the run's config.
    report_to: tuple[Literal["jsonl", "tensorboard", "wandb"], ...] = ()
    wandb_project: str = "prior_dist"
    # [first, last]: optimizer steps (1-based, inclusive) profiled on rank 0 with
    # torch.profiler into RUN_DIR/profile/ (ops.txt, trace.json); null: off.
    profile_steps: Annotated[tuple[PositiveInt, ...], Field(min_length=2, max_length=2)] | None = (
        None
    )
    # Warn (rank 0, at most once per window) when the loader's share of the step time over the
    # last `data_wait_window` steps exceeds `data_wait_warn` (null: never).
    data_wait_warn: NonNegativeFloat | None = 0.10
    data_wait_window: PositiveInt = 50

    def __post_init__(self) -> None:
        _require(
            self.profile_steps is None or self.profile_steps[0] <= self.profile_steps[1],
            f"logging.profile_steps must be [first, last] with first <= last, "
            f"got {self.profile_steps}",
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


@dataclass(frozen=True, config=SECTION)
class EvalConfig:
    zero_shot: bool = True
    classes: Annotated[tuple[str, ...], Field(min_length=2)] = CHEXPERT_COMPETITION
    prompt: str = DEFAULT_PROMPT
    # Combined score = global + local_weight x local; null: chosen on the validation split
    # (the paper's is 0.5).
    local_weight: float | None = None
    # Prompt and report sentences through the prototype bank in zero-shot and retrieval (off:
    # their own embeddings; docs/evaluation.md).
    bank: bool = False
    # Images per forward pass of the periodic and end-of-run evaluation.
    micro_batch_size: PositiveInt = 32
    # During pretraining: zero-shot accuracy and retrieval recall on this split every N
    # optimizer steps, logged with that step in metrics.jsonl (null: off).
    every_steps: PositiveInt | None = None
    split: str = "validate"
    # The end-of-run zero-shot evaluation's split.
    final_split: str = "test"

    def __post_init__(self) -> None:
        _require("{}" in self.prompt, f"eval.prompt must contain '{{}}', got {self.prompt!r}")


@dataclass(frozen=True, config=SECTION)
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
    # `init_from`: start from these weights (a run or checkpoint directory, an export, or
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


SECTIONS = {
    "data": DataConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
    "eval": EvalConfig,
}


def recipe_from_dict(raw: dict) -> Recipe:
    """Build and validate a recipe; the `model` section is `{name: <named config>, image: ...}`:
    a named model config with per-field changes and `compat_preset`. Fields under an old name
    (`MOVED_FIELDS`) are read under their new one."""
    raw = upgrade_moved_fields(raw)
    model_raw = raw.get("model") or {}
    if not isinstance(model_raw, dict):
        raise ValueError(f"model must be a mapping of sections, got {model_raw!r}")
    model_raw = dict(model_raw)
    base = model_config(model_raw.pop("name", "paper"), model_raw.pop("compat_preset", "default"))
    merged = base.to_dict()
    for section, values in model_raw.items():
        if section not in merged:
            raise ValueError(
                f"model: unknown section {section!r}; allowed: name, "
                f"compat_preset, {', '.join(merged)}"
            )
        if not isinstance(values, dict):
            raise ValueError(f"model.{section} must be a mapping of fields, got {values!r}")
        merged[section].update(values)
    sections = {name: raw.get(name) or {} for name in SECTIONS if name in raw}
    rest = {k: v for k, v in raw.items() if k not in SECTIONS and k != "model"}
    return build(Recipe, {**rest, **sections, "model": merged}, "")


_YAML_EXPONENT = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


class _YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader reading YAML 1.2 floats: YAML 1.1 reads `1e-5` (no dot) as a
    string, which a float field would then refuse."""


_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float", _YAML_EXPONENT, list("-+.0123456789"))


def read_yaml(text: str):
    return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 (a SafeLoader subclass)


# The recipe's own fields, outside any section.
_TOP_LEVEL_FIELDS = ("name", "init_from")


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`section.field=value` assignments on the raw recipe dict (YAML-parsed values). Every
    assignment whose path does not fit is named at once (`ValueError`), after the rest."""
    raw = json.loads(json.dumps(raw))
    problems = []
    for item in overrides:
        try:
            _assign(raw, item)
        except ValueError as err:
            problems.append(str(err))
    if len(problems) == 1:
        raise ValueError(problems[0])
    if problems:
        raise ValueError(f"{len(problems)} problems:\n  " + "\n  ".join(problems))
    return raw


def _assign(raw: dict, item: str) -> None:
    """One `--set` assignment on `raw`, or a ValueError naming why its path does not fit."""
    if "=" not in item:
        raise ValueError(f"--set {item!r}: expected section.field=value")
    path, text = item.split("=", 1)
    keys = path.strip().split(".")
    if len(keys) < 2 and keys[0] not in _TOP_LEVEL_FIELDS:
        raise ValueError(
            f"--set {item!r}: name a section and a field (section.field=value), or one of "
            f"{', '.join(_TOP_LEVEL_FIELDS)}"
        )
    value = read_yaml(text)
    node = raw
    for key in keys[:-1]:
        if isinstance(node, list):
            node = node[_list_index(node, key, item)]
        else:
            node = node.setdefault(key, {})
            if not isinstance(node, (dict, list)):
                raise ValueError(f"--set {item!r}: {key!r} is a value, not a section")
    last = keys[-1]
    if isinstance(node, list):
        node[_list_index(node, last, item)] = value
    else:
        node[last] = value


def _list_index(node: list, key: str, item: str) -> int:
    if not key.isdigit() or int(key) >= len(node):
        raise ValueError(f"--set {item!r}: {key!r} is not an index into a list of {len(node)}")
    return int(key)


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
        raw = read_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a recipe is a mapping of sections")
    raw.setdefault("name", path.stem)
    try:
        raw = apply_overrides(raw, overrides or [])
    except ValueError as err:  # the paths that do not fit, with the values that do not validate
        good = [o for o in overrides or [] if _fits(raw, o)]
        raise ValueError(
            _joined(str(err), _validation_problem(apply_overrides(raw, good)))
        ) from None
    return recipe_from_dict(raw), raw


def _fits(raw: dict, item: str) -> bool:
    try:
        apply_overrides(raw, [item])
    except ValueError:
        return False
    return True


def _validation_problem(raw: dict) -> str:
    try:
        recipe_from_dict(raw)
    except ValueError as err:
        return str(err)
    return ""


def _joined(*messages: str) -> str:
    """Several error messages (each one problem or "N problems:" and an indented list) as one."""
    lines = []
    for message in filter(None, messages):
        head, *rest = message.split("\n")
        lines += [r.strip() for r in rest] if head.endswith("problems:") else [message]
    return lines[0] if len(lines) == 1 else f"{len(lines)} problems:\n  " + "\n  ".join(lines)
