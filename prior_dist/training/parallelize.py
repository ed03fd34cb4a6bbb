"""The task made ready for many ranks: SyncBN, the global loss's gather, the DeepSpeed engine,
and the optimizer surgery the curriculum needs (fresh AdamW state per stage, the learning rate
per step). What torchtitan keeps beside its model in `parallelize.py`."""

from __future__ import annotations

import collections
import hashlib

import torch

from prior_dist.distributed import AllGather
from prior_dist.distributed.sync_bn import convert_batchnorm
from prior_dist.losses import LocalGather
from prior_dist.models import build_model
from prior_dist.models.config import ModelConfig
from prior_dist.task import PriorTask
from prior_dist.training.ds_config import DeepSpeedSettings, engine_config
from prior_dist.training.recipe import Recipe

_PRECISION_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def precision_dtype(ds: DeepSpeedSettings) -> torch.dtype:
    """The dtype the engine keeps its weights in (inputs are cast to it): fp32 under
    `torch_autocast`, where autocast casts per op."""
    if ds.autocast:
        return torch.float32
    return _PRECISION_DTYPES.get(ds.precision, torch.float32)


def build_task(
    cfg: ModelConfig, sync_batchnorm: bool, device_type: str, world_size: int
) -> PriorTask:
    """The model with batch statistics over the global batch (when asked) and the gather its
    global losses use."""
    # One rank has nothing to synchronise: the plain norm (cuDNN's kernel on CUDA).
    model = convert_batchnorm(build_model(cfg), device_type, sync_batchnorm and world_size > 1)
    gather = AllGather() if world_size > 1 else LocalGather()
    return PriorTask(model, gather)


def build_engine(task: PriorTask, recipe: Recipe, ds: DeepSpeedSettings, device_type: str):
    """The DeepSpeed engine over the task's trainable parameters."""
    # deepspeed takes seconds to import: config errors are reported before this runs.
    import deepspeed

    params = [p for p in task.parameters() if p.requires_grad]
    config = engine_config(ds, recipe, device_type)
    engine, *_ = deepspeed.initialize(model=task, model_parameters=params, config=config)
    return engine


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The innermost torch optimizer (under DeepSpeed's ZeRO / mixed-precision wrappers)."""
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


def reset_optimizer_state(engine) -> None:
    """A fresh AdamW state (moments and step counts) for a new stage; partitions stay."""
    base_optimizer(engine).state = collections.defaultdict(dict)


def set_learning_rate(engine, lr: float) -> None:
    for group in base_optimizer(engine).param_groups:
        group["lr"] = lr


def bank_digest(engine, zero_stage: int) -> str:
    """sha256 of this rank's prototype bank (the audit proves every rank holds the same)."""
    # deepspeed is heavy; the audit runs only with an engine, which has imported it already.
    import deepspeed

    weight = engine.module.model.prototype_bank.prototypes
    with deepspeed.zero.GatheredParameters([weight], enabled=zero_stage == 3):
        data = weight.detach().float().cpu().contiguous().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()
