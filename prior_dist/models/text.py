"""Text tower: BERT -> projected token embeddings -> per-sentence mean embeddings."""

from __future__ import annotations

import torch
from torch import nn

from prior_dist.models.bert import BertEncoder, config_from_hf, load_pretrained
from prior_dist.models.config import TextTowerConfig
from prior_dist.models.features import TextFeatures
from prior_dist.models.pooling import init_projection, sentence_means


class TextTower(nn.Module):
    def __init__(self, cfg: TextTowerConfig, embed_dim: int, reference_unused: bool = False):
        super().__init__()
        if cfg.pretrained:
            cfg = config_from_hf(cfg.pretrained, cfg)
        self.cfg = cfg
        self.bert = BertEncoder(cfg, with_pooler=reference_unused)
        self.token_proj = nn.Linear(cfg.hidden_size, embed_dim)
        init_projection(self.token_proj)
        # The reference's text global projection, never used: reference layout only, frozen.
        self.global_proj = None
        if reference_unused:
            self.global_proj = nn.Linear(cfg.hidden_size, embed_dim).requires_grad_(False)
        if cfg.pretrained:
            load_pretrained(self.bert, cfg.pretrained)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        sentence_index: torch.Tensor,
        max_sentences: int | None = None,
    ) -> TextFeatures:
        if input_ids.numel() and int(input_ids.max()) >= self.cfg.vocab_size:
            raise ValueError(
                f"text: token id {int(input_ids.max())} >= text.vocab_size="
                f"{self.cfg.vocab_size}; the tokenizer and the model disagree"
            )
        hidden = self.bert(input_ids, attention_mask)
        tokens = self.token_proj(hidden)
        sentences, mask = sentence_means(tokens, sentence_index, max_sentences)
        return TextFeatures(tokens, sentences, mask)
