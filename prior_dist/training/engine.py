"""The DeepSpeed engine around the task: the task made ready for many ranks (SyncBN, the global
loss's gather, compilation), the engine built, and what is done to its parameters and optimizer
from outside (fresh AdamW state per stage, the learning rate per step, the prototype bank's
start written into every copy of its weight)."""

from __future__ import annotations

import collections
import hashlib

import torch

from prior_dist.distributed import AllGather
from prior_dist.distributed.collectives import gather_rows
from prior_dist.distributed.sync_bn import convert_batchnorm
from prior_dist.kernels.local_attention import triton_available
from prior_dist.losses import SingleProcessGather
from prior_dist.models import build_model
from prior_dist.models.attention import resolve_attention_impl
from prior_dist.models.config import ModelConfig
from prior_dist.models.prior import PriorModel
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
    gather = AllGather() if world_size > 1 else SingleProcessGather()
    return PriorTask(model, gather)


# The modules `train.compile` compiles: both towers and every head. The losses between them
# stay eager (the assignment solver reads its costs on the host).
COMPILED_MODULES = (
    "image",
    "text",
    "report_pool",
    "local_alignment",
    "predictor",
    "prototype_bank",
    "sentence_decoder",
    "image_decoder",
)
# Graphs kept per module before torch falls back to eager: token buckets x sentence slots x
# train / eval, with room to spare.
SHAPES_PER_MODULE = 64


def wants_compile(setting: bool | str, device_type: str, zero_stage: int) -> bool:
    """`train.compile` resolved: `auto` compiles on CUDA under ZeRO 0-2. ZeRO-3 gathers each
    module's parameters in hooks around its forward, which a compiled forward would bypass."""
    if setting == "auto":
        return device_type == "cuda" and zero_stage < 3
    if setting and zero_stage == 3:
        raise ValueError(
            "train.compile=true cannot run under ZeRO-3 (its parameter-gathering hooks around "
            "each module's forward are not traced): use ZeRO 0-2 or train.compile=false"
        )
    return bool(setting)


def compile_towers_and_heads(model: PriorModel, device: torch.device) -> list[str]:
    """Compile the towers and heads in place, each for fixed shapes (one graph per batch shape;
    the loader's buckets keep those few). `nn.Module.compile` leaves parameter names, and so
    checkpoints and exports, as they were. A local alignment that runs the Triton kernel on
    CUDA stays eager: the kernel is one fused launch per direction already. Returns the names
    compiled."""
    # Fill the import caches and give the fallback warnings first: the compiled forwards then
    # read constants (a first-call import or warning inside a forward is a graph break).
    for setting in {model.cfg.image.attention_impl, model.cfg.text.attention_impl}:
        resolve_attention_impl(setting, device)
    triton_available()
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, SHAPES_PER_MODULE)
    triton_kernel = (
        device.type == "cuda" and model.local_alignment.impl != "torch" and triton_available()
    )
    names = [n for n in COMPILED_MODULES if not (n == "local_alignment" and triton_kernel)]
    for name in names:
        getattr(model, name).compile(dynamic=False)
    return names


def prepare_for_device(
    model: PriorModel, device: torch.device, compile_setting: bool | str, zero_stage: int
) -> list[str]:
    """On CUDA: channels_last convolution weights (the step hands images in that layout too)
    and cuDNN's autotuner (it pays with fixed shapes); then `train.compile`. Returns the names
    of the modules compiled (none when eager)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        model.to(memory_format=torch.channels_last)
    if not wants_compile(compile_setting, device.type, zero_stage):
        return []
    return compile_towers_and_heads(model, device)


def compile_summary() -> str:
    """What torch.compile did in this process: graphs compiled, graph breaks (each one a return
    to eager in the middle of a module: worth a report)."""
    counters = torch._dynamo.utils.counters
    breaks = sum(counters["graph_break"].values())
    return (
        f"train.compile: {counters['stats']['unique_graphs']} graphs compiled, "
        f"{breaks} graph breaks"
    )


def build_engine(
    task: PriorTask,
    recipe: Recipe,
    ds: DeepSpeedSettings,
    device_type: str,
    load_universal: bool = False,
):
    """The DeepSpeed engine over the task's trainable parameters (`load_universal`: it will
    load a checkpoint's universal form, `runs.checkpoints.universal_copy`)."""
    # deepspeed takes seconds to import: config errors are reported before this runs.
    import deepspeed

    params = [p for p in task.parameters() if p.requires_grad]
    config = engine_config(ds, recipe, device_type, load_universal)
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


@torch.no_grad()
def start_prototype_bank(engine, batch: dict, seed: int, zero_stage: int) -> int:
    """Set the engine's prototype bank from this global batch's sentences (the task computes
    the value, the same on every rank; here it is written into every copy of the weight: the
    ZeRO-3 partitions and the optimizer's fp32 master). Returns the distinct sentence count."""
    # deepspeed is heavy; this runs only with an engine, which has imported it already.
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param

    task = engine.module
    value, distinct = task.initial_bank(batch, seed, gather_rows)
    weight = task.model.prototype_bank.prototypes
    with deepspeed.zero.GatheredParameters([weight], modifier_rank=0, enabled=zero_stage == 3):
        weight.data.copy_(value.to(weight.device, weight.dtype))
    safe_set_full_fp32_param(weight, value.to(weight.device))
    return distinct
