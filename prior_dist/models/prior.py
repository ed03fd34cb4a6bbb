"""The PRIOR model: two towers and the heads of spec sections 2-5, as single-device modules.

`PriorModel.forward` computes the features a curriculum stage needs (`Needs`) and returns them
as `PriorFeatures`; `prior_dist.losses` turns features into losses and `prior_dist.task`
composes both per stage. Every parameter is used inside the forward of the module that owns
it (what ZeRO-3 needs), and the heads run in one fixed order, so draws from torch's generator
(bank noise, dropout) come in the same order whatever the stage.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from prior_dist.models.config import ModelConfig
from prior_dist.models.decoders import ImageDecoder, SentencePrototypeDecoder
from prior_dist.models.features import ImageFeatures, tokens_to_map
from prior_dist.models.local_alignment import LocalAlignment, LocalAlignmentOutput, Predictor
from prior_dist.models.matching import PendingCosts, align_to_targets
from prior_dist.models.pooling import AttentionPool
from prior_dist.models.prototypes import SentencePrototypeBank
from prior_dist.models.text import TextTower
from prior_dist.models.towers import build_image_tower

# `draw(stream, shape)`: `[B, *shape]` U(0, 1) noise of a named stream ("sentences" and
# "generated": the prototype bank's Gumbel noise; "feature_keep": the image decoder's feature
# dropout), or None, where torch's generator draws it.
Draw = Callable[[str, tuple[int, ...]], torch.Tensor | None]


def no_draw(_stream: str, _shape: tuple[int, ...]) -> None:
    return None


@dataclass(frozen=True)
class Needs:
    """What a forward pass computes after the encoders, the report embedding and the local
    alignment (which always run)."""

    bank: bool = False  # sentences through the prototype bank
    use_prototypes: bool = False  # prototypes replace the sentences from the report on
    predictions: bool = False  # the SimSiam predictor on patches and image context
    generation: bool = False  # generated sentences, matched to the targets
    bank_logits: bool = False  # the bank's logits of real and matched generated sentences
    generated_report: bool = False  # the matched sentences through the bank and report pool
    reconstruction: bool = False  # the image decoded from patches and image context


@dataclass
class Generation:
    """The sentence decoder's outputs matched to their targets (spec section 5)."""

    matched: torch.Tensor  # [B, Q, D], row j the output matched to target j
    targets: torch.Tensor  # [B, Q, D] the aligned sentences, zero-padded to Q rows
    target_mask: torch.Tensor  # [B, Q]
    real_logits: torch.Tensor | None = None  # [B, Q, K] the bank's logits of the real sentences
    matched_logits: torch.Tensor | None = None  # [B, Q, K] ... of the matched outputs
    report: torch.Tensor | None = None  # [B, D] the generated report's embedding


@dataclass
class PriorFeatures:
    """What `PriorModel.forward` returns; None where the stage did not need it."""

    image: ImageFeatures
    sentences: torch.Tensor  # [B, S, D]
    sentence_mask: torch.Tensor  # [B, S]
    prototypes: torch.Tensor | None  # [B, S, D] the sentences through the bank
    aligned: torch.Tensor  # [B, S, D] prototypes where the stage uses them, else sentences
    report: torch.Tensor  # [B, D]
    local: LocalAlignmentOutput
    global_scale: torch.Tensor
    local_scale: torch.Tensor
    predicted_patches: torch.Tensor | None = None  # predictor(patch tokens)
    predicted_context: torch.Tensor | None = None  # predictor(image context)
    reconstruction: torch.Tensor | None = None  # [B, 1, H, W]
    generation: Generation | None = None


class PriorModel(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        heads, compat = cfg.heads, cfg.compat
        dim = heads.embed_dim
        self.image = build_image_tower(cfg.image, dim, compat.token_layout)
        self.text = TextTower(cfg.text, dim, reference_unused=compat.reference_unused_params)
        self.report_pool = AttentionPool(dim, heads.report_pool_heads)
        self.local_alignment = LocalAlignment(dim, heads.local_attention_impl)
        self.predictor = Predictor(dim)
        self.prototype_bank = SentencePrototypeBank(
            heads.num_prototypes, dim, heads.gumbel_tau, eval_gumbel=compat.eval_gumbel
        )
        self.feature_dropout = nn.Dropout2d(heads.feature_dropout)
        self.image_decoder = ImageDecoder(
            2 * dim, heads.image_decoder_widths, heads.image_decoder_conv_bias
        )
        self.sentence_decoder = SentencePrototypeDecoder(
            dim,
            heads.num_queries,
            heads.decoder_layers,
            heads.decoder_heads,
            heads.decoder_intermediate,
            heads.decoder_dropout,
            heads.decoder_max_positions,
            causal=compat.decoder_mask == "causal",
            unused_vocab_size=cfg.text.vocab_size if compat.reference_unused_params else None,
            attention_impl=cfg.text.attention_impl,
        )
        self.logit_scales = LogitScales(heads.logit_scale_init, heads.logit_scale_max)

    @property
    def num_prototypes(self) -> int:
        return self.prototype_bank.num_prototypes

    @property
    def global_scale(self) -> torch.Tensor:
        return self.logit_scales()[0]

    @property
    def local_scale(self) -> torch.Tensor:
        return self.logit_scales()[1]

    def forward(
        self,
        image: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        sentence_index: torch.Tensor,
        needs: Needs,
        draw: Draw = no_draw,
        max_sentences: int | None = None,
        sentence_slots: int | None = None,
    ) -> PriorFeatures:
        """Both towers, then the heads `needs` asks for (`heads`)."""
        img = self.encode_image(image)
        txt = self.encode_text(
            input_ids, attention_mask, sentence_index, max_sentences, sentence_slots
        )
        return self.heads(img, txt.sentences, txt.sentence_mask, needs, draw)

    def heads(
        self,
        img: ImageFeatures,
        sentences: torch.Tensor,
        mask: torch.Tensor,
        needs: Needs,
        draw: Draw = no_draw,
        generated: torch.Tensor | None = None,
    ) -> PriorFeatures:
        """Everything after the encoders. `generated [B, Q, D]` replaces the sentence decoder's
        output when given (benchmarks time the heads without the decoder networks)."""
        prototypes = None
        if needs.bank:
            prototypes = self.prototype_bank(
                sentences, draw("sentences", (sentences.shape[1], self.num_prototypes))
            )
        aligned = prototypes if needs.use_prototypes else sentences
        global_scale, local_scale = self.logit_scales()
        out = PriorFeatures(
            image=img,
            sentences=sentences,
            sentence_mask=mask,
            prototypes=prototypes,
            aligned=aligned,
            report=self.report_embedding(aligned, mask),
            local=self.local_alignment(img.patch_tokens, aligned, mask),
            global_scale=global_scale,
            local_scale=local_scale,
        )
        if needs.predictions:
            out.predicted_patches = self.predictor(img.patch_tokens)
            out.predicted_context = self.predictor(out.local.image_context)
        pending = None
        if needs.generation:
            if generated is None:
                generated = self.sentence_decoder(img.patch_tokens)
            # The cost matrices start for the host now; the image decoder runs meanwhile.
            pending = self._start_matching(generated, sentences, aligned, mask)
        if needs.reconstruction:
            keep = draw("feature_keep", (self.cfg.heads.embed_dim,))
            out.reconstruction = self.reconstruct_image(
                img.patch_tokens, out.local.image_context, img.grid, keep
            )
        if pending is not None:
            out.generation = self._finish_matching(generated, pending, needs, draw)
        return out

    def _start_matching(self, generated, sentences, aligned, mask) -> tuple:
        """The generation targets (the aligned sentences, zero-padded to the Q queries), the
        real sentences as padded, and their cost matrices, already on their way to the host."""
        num_queries = generated.shape[1]
        targets = _pad_rows(aligned[:, :num_queries], num_queries)
        real = _pad_rows(sentences[:, :num_queries], num_queries)
        target_mask = _pad_rows(mask[:, :num_queries], num_queries)
        targets = targets * target_mask[..., None].to(targets.dtype)
        if self.cfg.heads.detach_generation_targets:
            targets, real = targets.detach(), real.detach()
        cost = torch.cdist(generated.detach().float(), targets.detach().float(), p=1)
        return targets, real, target_mask, PendingCosts(cost)

    def _finish_matching(self, generated, pending: tuple, needs: Needs, draw: Draw) -> Generation:
        targets, real, target_mask, costs = pending
        matched = align_to_targets(generated, costs.assignment(), self.cfg.compat.matching)
        out = Generation(matched, targets, target_mask)
        bank = self.prototype_bank
        if needs.bank_logits:
            out.real_logits = bank(real, logits_only=True)
            out.matched_logits = bank(matched, logits_only=True)
        if needs.generated_report:
            noise = draw("generated", (matched.shape[1], self.num_prototypes))
            out.report = self.report_embedding(bank(matched, noise), target_mask)
        return out

    def encode_image(self, image: torch.Tensor):
        return self.image(image)

    def encode_text(
        self, input_ids, attention_mask, sentence_index, max_sentences=None, num_slots=None
    ):
        return self.text(input_ids, attention_mask, sentence_index, max_sentences, num_slots)

    def report_embedding(self, sentences_BSD: torch.Tensor, mask_BS: torch.Tensor) -> torch.Tensor:
        """Per-report attention pool over the report's own sentences -> `[B, D]`."""
        return self.report_pool(sentences_BSD, mask_BS)

    def reconstruct_image(
        self,
        patch_tokens_BPD: torch.Tensor,
        image_context_BPD: torch.Tensor,
        grid: tuple[int, int],
        channel_uniform_BD: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Decode `[Dropout2d(image map), C_i map]` to a 1-channel image.

        `channel_uniform_BD` (U(0, 1) per sample and channel) ties the dropout mask to the
        samples; without it torch's RNG draws it.
        """
        layout = self.cfg.compat.token_layout
        image_map = tokens_to_map(patch_tokens_BPD, grid, layout)
        p = self.feature_dropout.p
        if self.training and p > 0 and channel_uniform_BD is not None:
            keep = (channel_uniform_BD >= p).to(image_map.dtype) / (1.0 - p)
            image_map = image_map * keep[:, :, None, None]
        else:
            image_map = self.feature_dropout(image_map)
        context_map = tokens_to_map(image_context_BPD, grid, layout)
        return self.image_decoder(torch.cat([image_map, context_map], dim=1))


class LogitScales(nn.Module):
    """The learnable scales `s = exp(t)` of the global and the intra-report InfoNCE.

    A module of its own so every use of the parameters happens inside its forward: ZeRO-3
    gathers a module's parameters only around that module's forward.
    """

    def __init__(self, init: float, limit: float | None = None):
        super().__init__()
        self.limit = limit
        # Shape [1], not 0-dim: DeepSpeed broadcasts parameters as byte views, which a 0-dim
        # tensor cannot give.
        self.global_log_scale = nn.Parameter(torch.tensor([math.log(init)]))
        self.local_log_scale = nn.Parameter(torch.tensor([math.log(init)]))

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        scales = torch.cat([self.global_log_scale, self.local_log_scale]).float().exp()
        if self.limit is not None:
            scales = scales.clamp(max=self.limit)
        return scales[0], scales[1]


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """Zero-pad (or keep) dimension 1 to `rows`."""
    missing = rows - x.shape[1]
    if missing <= 0:
        return x
    return torch.cat([x, x.new_zeros(x.shape[0], missing, *x.shape[2:])], dim=1)


def build_model(cfg: ModelConfig) -> PriorModel:
    return PriorModel(cfg)
