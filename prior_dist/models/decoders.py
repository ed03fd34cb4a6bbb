"""Cross-modality conditional reconstruction decoders (spec section 5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from prior_dist.models.attention import attention, resolve_attention_impl
from prior_dist.models.norms import layer_norm


class ImageDecoder(nn.Module):
    """`[B, 2D, h, w]` -> `[B, 1, 32h, 32w]`: five (2x nearest upsample, 2 x conv3x3-BN-ReLU)
    blocks without skip connections, then a 3x3 conv to one channel. `conv_bias=False` drops
    the biases of the convs BatchNorm follows (they do nothing there; the reference has none)."""

    def __init__(self, in_channels: int, widths: tuple[int, ...], conv_bias: bool = True):
        super().__init__()
        blocks, previous = [], in_channels
        for width in widths:
            blocks.append(
                nn.Sequential(
                    nn.Upsample(scale_factor=2, mode="nearest"),
                    nn.Conv2d(previous, width, 3, padding=1, bias=conv_bias),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                    nn.Conv2d(width, width, 3, padding=1, bias=conv_bias),
                    nn.BatchNorm2d(width),
                    nn.ReLU(inplace=True),
                )
            )
            previous = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Conv2d(previous, 1, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


class _DecoderLayer(nn.Module):
    """Post-LN BERT decoder layer: self-attention, cross-attention to image tokens, FFN."""

    def __init__(self, dim: int, heads: int, intermediate: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.self_qkv = nn.Linear(dim, 3 * dim)
        self.self_out = nn.Linear(dim, dim)
        self.self_norm = layer_norm(dim, 1e-12)
        self.cross_q = nn.Linear(dim, dim)
        self.cross_kv = nn.Linear(dim, 2 * dim)
        self.cross_out = nn.Linear(dim, dim)
        self.cross_norm = layer_norm(dim, 1e-12)
        self.ffn_in = nn.Linear(dim, intermediate)
        self.ffn_out = nn.Linear(intermediate, dim)
        self.ffn_norm = layer_norm(dim, 1e-12)

    def forward(
        self, x: torch.Tensor, memory: torch.Tensor, causal: bool, impl: str
    ) -> torch.Tensor:
        p = self.dropout if self.training else 0.0
        q, k, v = rearrange(
            self.self_qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads
        )
        ctx = rearrange(
            attention(q, k, v, impl=impl, causal=causal, dropout_p=p), "b h n d -> b n (h d)"
        )
        x = self.self_norm(x + F.dropout(self.self_out(ctx), p, self.training))
        q = rearrange(self.cross_q(x), "b n (h d) -> b h n d", h=self.heads)
        k, v = rearrange(self.cross_kv(memory), "b m (two h d) -> two b h m d", two=2, h=self.heads)
        ctx = rearrange(attention(q, k, v, impl=impl, dropout_p=p), "b h n d -> b n (h d)")
        x = self.cross_norm(x + F.dropout(self.cross_out(ctx), p, self.training))
        hidden = F.gelu(self.ffn_in(x))
        return self.ffn_norm(x + F.dropout(self.ffn_out(hidden), p, self.training))


class SentencePrototypeDecoder(nn.Module):
    """Non-autoregressive generation of Q sentence prototypes from image tokens, in one pass.

    Learned queries plus absolute position and token-type embeddings go through a BERT-style
    decoder. `causal=True` is the reference quirk (`decoder_mask: causal`).
    """

    def __init__(
        self,
        dim: int,
        num_queries: int,
        layers: int,
        heads: int,
        intermediate: int,
        dropout: float,
        max_positions: int,
        causal: bool = False,
        unused_vocab_size: int | None = None,
        attention_impl: str = "auto",
    ):
        super().__init__()
        self.causal = causal
        self.dropout = dropout
        self.attention_impl = attention_impl
        self.queries = nn.Parameter(torch.randn(num_queries, dim))
        self.position_embeddings = nn.Embedding(max_positions, dim)
        self.token_type_embeddings = nn.Embedding(2, dim)
        self.embed_norm = layer_norm(dim, 1e-12)
        self.layers = nn.ModuleList(
            _DecoderLayer(dim, heads, intermediate, dropout) for _ in range(layers)
        )
        # The reference decoder is a BertModel whose word embeddings are never looked up
        # (queries enter as embeddings): built, frozen, only in the reference layout.
        self.word_embeddings = (
            nn.Embedding(unused_vocab_size, dim).requires_grad_(False)
            if unused_vocab_size
            else None
        )
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, image_tokens_BPD: torch.Tensor) -> torch.Tensor:
        batch, num_queries = image_tokens_BPD.shape[0], self.queries.shape[0]
        positions = torch.arange(num_queries, device=self.queries.device)
        x = (
            self.queries
            + self.position_embeddings(positions)
            + self.token_type_embeddings(torch.zeros_like(positions))
        ).to(image_tokens_BPD.dtype)
        x = F.dropout(self.embed_norm(x), self.dropout, self.training)
        x = x.expand(batch, -1, -1)
        impl = resolve_attention_impl(self.attention_impl, x.device)
        for layer in self.layers:
            x = layer(x, image_tokens_BPD, self.causal, impl)
        return x
