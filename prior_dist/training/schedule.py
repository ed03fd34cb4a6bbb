"""Per-stage learning rate: linear warm-up from `warmup_start_lr`, then cosine to 0."""

from __future__ import annotations

import math
from dataclasses import dataclass

from prior_dist.training.recipe import StageConfig


@dataclass(frozen=True)
class StageSpan:
    stage: int  # 1, 2, 3
    start: int  # first optimizer step (global count) of the stage
    steps: int
    warmup: int
    config: StageConfig

    @property
    def end(self) -> int:
        return self.start + self.steps


def plan_stages(stages: tuple[StageConfig, ...], steps_per_epoch: int) -> list[StageSpan]:
    """Stage lengths in optimizer steps, from epochs (x steps_per_epoch, rounded) or steps."""
    if steps_per_epoch < 1:
        raise ValueError(
            "an epoch gives no optimizer step: the training split is smaller than "
            "one global batch (micro-batch x accumulation x ranks)"
        )
    spans, start = [], 0
    for index, cfg in enumerate(stages, start=1):
        steps = cfg.steps if cfg.steps is not None else round(cfg.epochs * steps_per_epoch)
        if cfg.warmup_steps is not None:
            warmup = cfg.warmup_steps
        elif cfg.warmup_epochs is not None:
            warmup = round(cfg.warmup_epochs * steps_per_epoch)
        else:
            warmup = 0
        spans.append(StageSpan(index, start, steps, min(warmup, steps), cfg))
        start += steps
    return spans


def learning_rate(span: StageSpan, step: int) -> float:
    """The rate for global optimizer step `step` (inside `span`)."""
    i = step - span.start
    cfg = span.config
    if i < span.warmup:
        return cfg.warmup_start_lr + (cfg.lr - cfg.warmup_start_lr) * i / span.warmup
    decay = max(1, span.steps - span.warmup)
    progress = min(1.0, (i - span.warmup) / decay)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
