"""A BERT encoder that loads Hugging Face BERT checkpoints and runs fused attention.

Post-LN BERT (embeddings -> N x [self-attention, FFN]) with a fused QKV projection. With
flash-attn on CUDA in half precision the whole stack runs padding-free on packed tokens
(`[T, H]`, cumulative sequence lengths); otherwise padded `[B, L, H]` through SDPA.
Checkpoints in the Hugging Face `BertModel` layout are converted by
`prior_dist.models.state_dict.bert_from_hf`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from prior_dist.models.attention import attention, resolve_attention_impl, varlen_attention
from prior_dist.models.config import TextTowerConfig
from prior_dist.models.norms import layer_norm
from prior_dist.models.state_dict import (
    bert_config_from_hf,
    bert_from_hf,
    load_hf_weights,
    read_hf_config,
)


@dataclass
class _Packing:
    """Where real tokens sit in the padded batch, for the padding-free path."""

    indices: torch.Tensor  # [T] flat positions of real tokens in [B * L]
    cu_seqlens: torch.Tensor  # [B + 1] int32
    max_seqlen: int


class BertLayer(nn.Module):
    def __init__(self, cfg: TextTowerConfig):
        super().__init__()
        h = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.dropout = cfg.dropout
        self.qkv = nn.Linear(h, 3 * h)
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = layer_norm(h, cfg.layer_norm_eps)
        self.ffn_in = nn.Linear(h, cfg.intermediate_size)
        self.ffn_out = nn.Linear(cfg.intermediate_size, h)
        self.ffn_norm = layer_norm(h, cfg.layer_norm_eps)

    def forward(
        self, x: torch.Tensor, key_mask: torch.Tensor | None, impl: str, packing: _Packing | None
    ) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        qkv = self.qkv(x)
        if packing is not None:
            q, k, v = rearrange(qkv, "t (three h d) -> three t h d", three=3, h=self.num_heads)
            ctx = varlen_attention(q, k, v, packing.cu_seqlens, packing.max_seqlen, dropout_p=p)
            ctx = rearrange(ctx, "t h d -> t (h d)")
        else:
            q, k, v = rearrange(qkv, "b l (three h d) -> three b h l d", three=3, h=self.num_heads)
            ctx = attention(q, k, v, impl=impl, key_mask=key_mask, dropout_p=p)
            ctx = rearrange(ctx, "b h l d -> b l (h d)")
        x = self.attn_norm(x + F.dropout(self.attn_out(ctx), p, self.training))
        hidden = F.gelu(self.ffn_in(x))
        return self.ffn_norm(x + F.dropout(self.ffn_out(hidden), p, self.training))


class BertEncoder(nn.Module):
    """`input_ids`, `attention_mask` `[B, L]` -> last hidden state `[B, L, H]` (pad rows zero
    on the padding-free path, unspecified but finite on the padded one)."""

    def __init__(self, cfg: TextTowerConfig, with_pooler: bool = False):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.word_embeddings = nn.Embedding(cfg.vocab_size, h, padding_idx=cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, h)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, h)
        self.embed_norm = layer_norm(h, cfg.layer_norm_eps)
        self.layers = nn.ModuleList(BertLayer(cfg) for _ in range(cfg.num_layers))
        # The reference keeps BERT's pooler although nothing uses it: built only in that layout,
        # frozen so that no trainable parameter goes without a gradient.
        self.pooler = nn.Linear(h, h) if with_pooler else None
        if self.pooler is not None:
            self.pooler.requires_grad_(False)
        self.activation_checkpointing = cfg.activation_checkpointing
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        with torch.no_grad():
            self.word_embeddings.weight[self.cfg.pad_token_id].zero_()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        batch, length = input_ids.shape
        if length > self.cfg.max_position_embeddings:
            raise ValueError(
                f"text: {length} tokens exceed text.max_position_embeddings="
                f"{self.cfg.max_position_embeddings}"
            )
        mask = attention_mask.to(torch.bool)
        positions = torch.arange(length, device=input_ids.device)
        # Every parameter is used through its module's forward (ZeRO-3 gathers it there).
        token_types = torch.zeros_like(positions)
        x = (
            self.word_embeddings(input_ids)
            + self.position_embeddings(positions)[None]
            + self.token_type_embeddings(token_types)[None]
        )
        x = F.dropout(self.embed_norm(x), self.cfg.dropout, self.training)
        impl = resolve_attention_impl(self.cfg.attention_impl, x.device)
        packing = None
        if impl == "flash" and x.dtype in (torch.float16, torch.bfloat16):
            lengths = mask.sum(dim=1, dtype=torch.int32)
            packing = _Packing(
                indices=mask.flatten().nonzero().squeeze(1),
                cu_seqlens=F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0)),
                max_seqlen=int(lengths.max()),
            )
            x = rearrange(x, "b l h -> (b l) h")[packing.indices]
        elif impl == "flash":
            impl = "sdpa"  # flash kernels take half precision only
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, mask, impl, packing, use_reentrant=False)
            else:
                x = layer(x, mask, impl, packing)
        if packing is not None:
            full = x.new_zeros(batch * length, x.shape[-1])
            x = rearrange(full.index_copy(0, packing.indices, x), "(b l) h -> b l h", b=batch)
        return x


def config_from_hf(path_or_id: str, base: TextTowerConfig) -> TextTowerConfig:
    """`base` with the shape fields of a Hugging Face BERT config (local dir or hub id)."""
    return bert_config_from_hf(read_hf_config(path_or_id), base, path_or_id)


def load_pretrained(encoder: BertEncoder, path_or_id: str) -> None:
    """Load a Hugging Face BERT checkpoint strictly (the pooler only where the layout has one)."""
    state = bert_from_hf(load_hf_weights(path_or_id))
    if encoder.pooler is None:
        state = {k: v for k, v in state.items() if not k.startswith("pooler.")}
    result = encoder.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"{path_or_id}: checkpoint does not fit text tower: missing "
            f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
