"""The PRIOR model: two towers and the heads of spec sections 2-5, as single-device modules.

The model computes features; `prior_dist.losses` turns them into losses and
`prior_dist.training.task` composes both per curriculum stage.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from prior_dist.models.config import ModelConfig
from prior_dist.models.decoders import ImageDecoder, SentencePrototypeDecoder
from prior_dist.models.features import tokens_to_map
from prior_dist.models.local_alignment import LocalAlignment, Predictor
from prior_dist.models.pooling import AttentionPool
from prior_dist.models.prototypes import SentencePrototypeBank
from prior_dist.models.text import TextTower
from prior_dist.models.towers import build_image_tower


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


def build_model(cfg: ModelConfig) -> PriorModel:
    return PriorModel(cfg)
