"""The PRIOR task: a batch and a stage plan in, named losses and their weighted total out."""

from __future__ import annotations

import torch
from torch import nn

from prior_dist.losses import (
    LocalGather,
    align_to_targets,
    global_contrastive_loss,
    image_reconstruction_loss,
    intra_report_contrastive_loss,
    prototype_kl_loss,
    prototype_l1_loss,
    sentence_generation_loss,
    simsiam_loss,
)
from prior_dist.losses.contrastive import Gather
from prior_dist.losses.matching import PendingCosts
from prior_dist.models.prior import PriorModel
from prior_dist.task.curriculum import StagePlan
from prior_dist.task.noise import SampleNoise
from prior_dist.task.prototype_init import init_bank_from_batch

Noise = SampleNoise | dict[str, torch.Tensor] | None


class PriorTask(nn.Module):
    """A `PriorModel` and the gather of the global loss; its forward returns the losses.

    This is the module a DeepSpeed engine wraps, so every parameter is used inside the forward
    of the module that owns it (what ZeRO-3 needs).
    """

    def __init__(self, model: PriorModel, gather: Gather | None = None):
        super().__init__()
        self.model = model
        self.gather = gather or LocalGather()

    def forward(
        self, batch: dict, plan: StagePlan, gumbel_noise: Noise = None
    ) -> dict[str, torch.Tensor]:
        """Losses by name (only those `plan` runs) plus `total`, the weighted sum.

        `gumbel_noise` ties the randomness to the samples: a `SampleNoise` (drawn on the device
        from the samples' seeds, only for the streams this stage uses), or a dict of U(0, 1)
        tensors `sentences [B, S, K]`, `generated [B, Q, K]` (the prototype bank's noise) and
        `feature_keep [B, D]` (the stage-3 feature dropout). Without it torch's RNG draws it.
        """
        model = self.model
        img = model.encode_image(batch["image"])
        txt = model.encode_text(
            batch["input_ids"],
            batch["attention_mask"],
            batch["sentence_index"],
            plan.max_sentences,
            batch.get("sentence_slots"),
        )
        return self.head_losses(
            img, txt.sentences, txt.sentence_mask, batch["image"], plan, gumbel_noise
        )

    @property
    def bank_starts_from_sentences(self) -> bool:
        """`heads.prototype_init: sentences`: stage 2 starts the bank from a batch's sentences."""
        return self.model.cfg.heads.prototype_init == "sentences"

    def start_prototype_bank(self, batch: dict, seed: int, zero_stage: int) -> int:
        """Set the prototype bank from this global batch's sentences (identical on every rank);
        returns how many distinct sentences it found."""
        return init_bank_from_batch(self.model, batch, seed, zero_stage)

    def head_losses(
        self,
        img,
        sentences,
        mask,
        image,
        plan: StagePlan,
        gumbel_noise: Noise = None,
        generated: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Everything after the encoders. `generated [B, Q, D]` replaces the sentence decoder's
        output when given (benchmarks time the heads without the decoder networks)."""
        model, noise = self.model, gumbel_noise
        losses: dict[str, torch.Tensor] = {}
        aligned = sentences
        if plan.use_prototypes or plan.runs("proto"):
            draw = _noise(noise, "sentences", (sentences.shape[1], model.num_prototypes))
            prototypes = model.prototype_bank(sentences, draw)
            if plan.runs("proto"):
                losses["proto"] = prototype_l1_loss(
                    sentences, prototypes, mask, self._rows_per_rank(mask)
                )
            if plan.use_prototypes:
                aligned = prototypes
        report = model.report_embedding(aligned, mask)
        if plan.runs("global"):
            losses["global"] = global_contrastive_loss(
                img.global_embedding, report, model.global_scale, self.gather
            )
        local = model.local_alignment(img.patch_tokens, aligned, mask)
        if plan.runs("local_image"):
            losses["local_image"] = simsiam_loss(
                model.predictor, img.patch_tokens, local.image_context
            )
        if plan.runs("local_text"):
            losses["local_text"] = intra_report_contrastive_loss(
                local.text_context, aligned, mask, model.local_scale
            )
        matching = None
        if any(plan.runs(n) for n in ("spg", "kl", "gpa")):
            if generated is None:
                generated = model.sentence_decoder(img.patch_tokens)
            # The cost matrices start for the host now; the image decoder runs meanwhile.
            matching = self._start_matching(generated, sentences, aligned, mask)
        if plan.runs("rec_image"):
            reconstruction = model.reconstruct_image(
                img.patch_tokens,
                local.image_context,
                img.grid,
                _noise(noise, "feature_keep", (model.cfg.heads.embed_dim,)),
            )
            losses["rec_image"] = image_reconstruction_loss(reconstruction, image)
        if matching is not None:
            losses.update(self._generation_losses(generated, matching, report, plan, noise))
        total = sum(plan.weights[name] * value for name, value in losses.items())
        return {**losses, "total": total}

    def _rows_per_rank(self, mask_BS: torch.Tensor) -> torch.Tensor | None:
        """`rows_per_rank` for `heads.sentence_loss_mean: pooled`; None for `per_report`."""
        if self.model.cfg.heads.sentence_loss_mean != "pooled":
            return None
        return rows_per_rank(mask_BS, self.gather)

    def _start_matching(self, generated, sentences, aligned, mask) -> dict:
        """The generation targets and their cost matrices, already on their way to the host."""
        num_queries = generated.shape[1]
        targets = _pad_rows(aligned[:, :num_queries], num_queries)  # prototypes
        real = _pad_rows(sentences[:, :num_queries], num_queries)
        target_mask = _pad_rows(mask[:, :num_queries], num_queries)
        targets = targets * target_mask[..., None].to(targets.dtype)
        if self.model.cfg.heads.detach_generation_targets:
            targets, real = targets.detach(), real.detach()
        cost = torch.cdist(generated.detach().float(), targets.detach().float(), p=1)
        return {
            "targets": targets,
            "real": real,
            "target_mask": target_mask,
            "costs": PendingCosts(cost),
        }

    def _generation_losses(self, generated, matching: dict, report, plan, noise):
        model = self.model
        targets, real = matching["targets"], matching["real"]
        target_mask = matching["target_mask"]
        assignment = matching["costs"].assignment()
        matched = align_to_targets(generated, assignment, model.cfg.compat.matching)
        out = {}
        if plan.runs("spg"):
            out["spg"] = sentence_generation_loss(matched, targets)
        if plan.runs("kl"):
            bank = model.prototype_bank
            out["kl"] = prototype_kl_loss(
                bank(real, logits_only=True),
                bank(matched, logits_only=True),
                target_mask,
                self._rows_per_rank(target_mask),
            )
        if plan.runs("gpa"):
            draw = _noise(noise, "generated", (matched.shape[1], model.num_prototypes))
            prototypes = model.prototype_bank(matched, draw)
            generated_report = model.report_embedding(prototypes, target_mask)
            out["gpa"] = global_contrastive_loss(
                generated_report, report, model.global_scale, self.gather
            )
        return out


def rows_per_rank(mask_BS: torch.Tensor, gather) -> torch.Tensor:
    """The global batch's valid rows (every rank's count, gathered) over the number of ranks:
    the divisor that makes the pooled sentence mean rank-independent. No gradient."""
    count = mask_BS.detach().float().sum().reshape(1, 1)
    return gather(count).sum() / gather.world_size


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """Zero-pad (or keep) dimension 1 to `rows`."""
    missing = rows - x.shape[1]
    if missing <= 0:
        return x
    return torch.cat([x, x.new_zeros(x.shape[0], missing, *x.shape[2:])], dim=1)


def _noise(noise: Noise, name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
    """`[B, *shape]` U(0, 1) of stream `name`, or None (torch's RNG then draws)."""
    if isinstance(noise, SampleNoise):
        return noise.draw(name, shape)
    value = (noise or {}).get(name)
    if value is None:
        return None
    return value[:, : shape[0]]
