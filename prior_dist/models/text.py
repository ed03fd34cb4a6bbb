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
        num_slots: int | None = None,
    ) -> TextFeatures:
        """`num_slots`: the batch's largest sentence index + 1 when the caller knows it on the
        host (the training step does); else it is read from `sentence_index`."""
        if input_ids.numel():
            self._check_vocabulary(input_ids)
        hidden = self.bert(input_ids, attention_mask)
        tokens = self.token_proj(hidden)
        sentences, mask = sentence_means(tokens, sentence_index, max_sentences, num_slots)
        return TextFeatures(tokens, sentences, mask)

    def _check_vocabulary(self, input_ids: torch.Tensor) -> None:
        """Ids within the vocabulary, checked where the ids are: on an accelerator the host does
        not wait for the answer (the trainer compares the tokenizer's size with the model's
        before the first step, with a message naming both)."""
        limit = self.cfg.vocab_size
        torch._assert_async(
            input_ids.max() < limit,
            f"text: a token id is >= text.vocab_size={limit}; the tokenizer and the model disagree",
        )
