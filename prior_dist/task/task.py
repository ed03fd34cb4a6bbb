"""The PRIOR task: a batch and a stage plan in, named losses and their weighted total out.

`PriorTask.forward` reads in three steps: the plan says what the model must compute
(`needs`), the model computes it (`PriorModel.forward`), and each loss the plan runs is one
function of those features (`losses`), summed with the plan's weights.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from prior_dist.losses import (
    SingleProcessGather,
    global_contrastive_loss,
    image_reconstruction_loss,
    intra_report_contrastive_loss,
    prototype_kl_loss,
    prototype_l1_loss,
    sentence_generation_loss,
    simsiam_loss,
)
from prior_dist.losses.contrastive import Gather
from prior_dist.models.prior import Needs, PriorFeatures, PriorModel
from prior_dist.task.curriculum import StagePlan
from prior_dist.task.noise import SampleNoise
from prior_dist.task.prototype_init import initial_bank

Noise = SampleNoise | dict[str, torch.Tensor] | None


def needs(plan: StagePlan) -> Needs:
    """What the model computes for the losses `plan` runs."""
    return Needs(
        bank=plan.use_prototypes or plan.runs("proto"),
        use_prototypes=plan.use_prototypes,
        predictions=plan.runs("local_image"),
        generation=any(plan.runs(n) for n in ("spg", "kl", "gpa")),
        bank_logits=plan.runs("kl"),
        generated_report=plan.runs("gpa"),
        reconstruction=plan.runs("rec_image"),
    )


class PriorTask(nn.Module):
    """A `PriorModel` and the gather of the global loss; its forward returns the losses.

    This is the module a DeepSpeed engine wraps: the model's forward runs inside it, so every
    parameter is used inside the forward of the module that owns it (what ZeRO-3 needs).
    """

    def __init__(self, model: PriorModel, gather: Gather | None = None):
        super().__init__()
        self.model = model
        self.gather = gather or SingleProcessGather()

    def forward(self, batch: dict, plan: StagePlan, noise: Noise = None) -> dict[str, torch.Tensor]:
        """Losses by name (only those `plan` runs) plus `total`, the weighted sum.

        `noise` ties the randomness to the samples: a `SampleNoise` (drawn on the device from
        the samples' seeds, only for the streams this stage uses), or a dict of U(0, 1) tensors
        `sentences [B, S, K]`, `generated [B, Q, K]` (the prototype bank's Gumbel noise) and
        `feature_keep [B, D]` (the stage-3 feature dropout). Without it torch's RNG draws it.
        """
        features = self.model(
            batch["image"],
            batch["input_ids"],
            batch["attention_mask"],
            batch["sentence_index"],
            needs(plan),
            functools.partial(_noise, noise),
            plan.max_sentences,
            batch.get("sentence_slots"),
        )
        return self.weighted(self.losses(features, batch["image"], plan), plan)

    def head_losses(
        self, img, sentences, mask, image, plan: StagePlan, noise: Noise = None, generated=None
    ) -> dict[str, torch.Tensor]:
        """The losses and total from encoder outputs on (tests and benchmarks of the heads);
        `generated` replaces the sentence decoder's output when given."""
        features = self.model.heads(
            img, sentences, mask, needs(plan), functools.partial(_noise, noise), generated
        )
        return self.weighted(self.losses(features, image, plan), plan)

    @staticmethod
    def weighted(losses: dict[str, torch.Tensor], plan: StagePlan) -> dict[str, torch.Tensor]:
        total = sum(plan.weights[name] * value for name, value in losses.items())
        return {**losses, "total": total}

    def losses(self, f: PriorFeatures, image, plan: StagePlan) -> dict[str, torch.Tensor]:
        """Each loss `plan` runs as one function of the features (this order: the total sums
        them in it)."""
        mask = f.sentence_mask
        out: dict[str, torch.Tensor] = {}
        if plan.runs("proto"):
            out["proto"] = prototype_l1_loss(
                f.sentences, f.prototypes, mask, self._rows_per_rank(mask)
            )
        if plan.runs("global"):
            out["global"] = global_contrastive_loss(
                f.image.global_embedding, f.report, f.global_scale, self.gather
            )
        if plan.runs("local_image"):
            out["local_image"] = simsiam_loss(
                f.predicted_patches,
                f.image.patch_tokens,
                f.predicted_context,
                f.local.image_context,
            )
        if plan.runs("local_text"):
            out["local_text"] = intra_report_contrastive_loss(
                f.local.text_context, f.aligned, mask, f.local_scale
            )
        if plan.runs("rec_image"):
            out["rec_image"] = image_reconstruction_loss(f.reconstruction, image)
        g = f.generation
        if plan.runs("spg"):
            out["spg"] = sentence_generation_loss(g.matched, g.targets)
        if plan.runs("kl"):
            out["kl"] = prototype_kl_loss(
                g.real_logits, g.matched_logits, g.target_mask, self._rows_per_rank(g.target_mask)
            )
        if plan.runs("gpa"):
            out["gpa"] = global_contrastive_loss(g.report, f.report, f.global_scale, self.gather)
        return out

    @property
    def bank_starts_from_sentences(self) -> bool:
        """`heads.prototype_init: sentences`: stage 2 starts the bank from a batch's sentences."""
        return self.model.cfg.heads.prototype_init == "sentences"

    def initial_bank(self, batch: dict, seed: int, gather_rows) -> tuple[torch.Tensor, int]:
        """The prototype bank's start from this global batch's sentences (the same on every
        rank; `gather_rows` concatenates every rank's rows) and how many distinct sentences it
        found. Writing it into the engine's copies is the engine's business."""
        return initial_bank(self.model, batch, seed, gather_rows)

    def _rows_per_rank(self, mask_BS: torch.Tensor) -> torch.Tensor | None:
        """`rows_per_rank` for `heads.sentence_loss_mean: pooled`; None for `per_report`."""
        if self.model.cfg.heads.sentence_loss_mean != "pooled":
            return None
        return rows_per_rank(mask_BS, self.gather)


def rows_per_rank(mask_BS: torch.Tensor, gather) -> torch.Tensor:
    """The global batch's valid rows (every rank's count, gathered) over the number of ranks:
    the divisor that makes the pooled sentence mean rank-independent. No gradient."""
    count = mask_BS.detach().float().sum().reshape(1, 1)
    return gather(count).sum() / gather.world_size


def _noise(noise: Noise, name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
    """`[B, *shape]` U(0, 1) of stream `name`, or None (torch's RNG then draws)."""
    if isinstance(noise, SampleNoise):
        return noise.draw(name, shape)
    value = (noise or {}).get(name)
    if value is None:
        return None
    return value[:, : shape[0]]
