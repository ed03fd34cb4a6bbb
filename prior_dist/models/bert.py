"""A BERT encoder that loads Hugging Face BERT checkpoints and runs fused attention.

Post-LN BERT (embeddings -> N x [self-attention, FFN]) with a fused QKV projection. With
flash-attn on CUDA in half precision the whole stack runs padding-free on packed tokens
(`[T, H]`, cumulative sequence lengths); otherwise padded `[B, L, H]` through SDPA.
Checkpoints in the Hugging Face `BertModel` layout are converted by `convert_hf_state_dict`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.utils.checkpoint import checkpoint

from prior_dist.models.attention import attention, resolve_attention_impl, varlen_attention
from prior_dist.models.config import TextTowerConfig
from prior_dist.models.norms import layer_norm


@dataclass
class _Packing:
    """Where real tokens sit in the padded batch, for the padding-free path."""

    indices: torch.Tensor      # [T] flat positions of real tokens in [B * L]
    cu_seqlens: torch.Tensor   # [B + 1] int32
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

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None, impl: str,
                packing: _Packing | None) -> torch.Tensor:
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
            raise ValueError(f"text: {length} tokens exceed text.max_position_embeddings="
                             f"{self.cfg.max_position_embeddings}")
        mask = attention_mask.to(torch.bool)
        positions = torch.arange(length, device=input_ids.device)
        # Every parameter is used through its module's forward (ZeRO-3 gathers it there).
        token_types = torch.zeros_like(positions)
        x = (self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
             + self.token_type_embeddings(token_types)[None])
        x = F.dropout(self.embed_norm(x), self.cfg.dropout, self.training)
        impl = resolve_attention_impl(self.cfg.attention_impl, x.device)
        packing = None
        if impl == "flash" and x.dtype in (torch.float16, torch.bfloat16):
            lengths = mask.sum(dim=1, dtype=torch.int32)
            packing = _Packing(indices=mask.flatten().nonzero().squeeze(1),
                               cu_seqlens=F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0)),
                               max_seqlen=int(lengths.max()))
            x = rearrange(x, "b l h -> (b l) h")[packing.indices]
        elif impl == "flash":
            impl = "sdpa"   # flash kernels take half precision only
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                x = checkpoint(layer, x, mask, impl, packing, use_reentrant=False)
            else:
                x = layer(x, mask, impl, packing)
        if packing is not None:
            full = x.new_zeros(batch * length, x.shape[-1])
            x = rearrange(full.index_copy(0, packing.indices, x), "(b l) h -> b l h", b=batch)
        return x


# Hugging Face BertModel parameter names -> ours; q/k/v are fused into `qkv`.
_HF_LAYER = {
    "attention.output.dense": "attn_out",
    "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "ffn_in",
    "output.dense": "ffn_out",
    "output.LayerNorm": "ffn_norm",
}
_HF_TOP = {
    "embeddings.word_embeddings": "word_embeddings",
    "embeddings.position_embeddings": "position_embeddings",
    "embeddings.token_type_embeddings": "token_type_embeddings",
    "embeddings.LayerNorm": "embed_norm",
    "pooler.dense": "pooler",
}
# Present in Hugging Face checkpoints, never part of an encoder.
_HF_IGNORED = ("cls.", "embeddings.position_ids")


def convert_hf_state_dict(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A `BertModel` / `BertForPreTraining` state dict in our layout; unknown keys raise."""
    flat = {}
    for key, value in hf.items():
        key = key.removeprefix("bert.")
        key = key.replace(".gamma", ".weight").replace(".beta", ".bias")   # old TF exports
        if key.startswith(_HF_IGNORED):
            continue
        flat[key] = value
    out, qkv, unknown = {}, {}, []
    for key, value in flat.items():
        stem, _, leaf = key.rpartition(".")
        if stem in _HF_TOP:
            out[f"{_HF_TOP[stem]}.{leaf}"] = value
            continue
        parts = stem.split(".")
        if len(parts) >= 4 and parts[0] == "encoder" and parts[1] == "layer":
            index, inner = parts[2], ".".join(parts[3:])
            if inner in ("attention.self.query", "attention.self.key", "attention.self.value"):
                qkv.setdefault((index, leaf), {})[inner.rsplit(".", 1)[1]] = value
                continue
            if inner in _HF_LAYER:
                out[f"layers.{index}.{_HF_LAYER[inner]}.{leaf}"] = value
                continue
        unknown.append(key)
    if unknown:
        raise ValueError(f"BERT checkpoint: unexpected parameter(s) {unknown[:5]}"
                         f"{' ...' if len(unknown) > 5 else ''}")
    for (index, leaf), parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise ValueError(f"BERT checkpoint: layer {index} lacks one of query/key/value.{leaf}")
        out[f"layers.{index}.qkv.{leaf}"] = torch.cat([parts["query"], parts["key"],
                                                       parts["value"]])
    return out


def config_from_hf(path_or_id: str, base: TextTowerConfig) -> TextTowerConfig:
    """`base` with the shape fields of a Hugging Face BERT config (local dir or hub id)."""
    import dataclasses

    hf = _read_hf_config(path_or_id)
    fields = {"vocab_size": "vocab_size", "hidden_size": "hidden_size",
              "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
              "intermediate_size": "intermediate_size",
              "max_position_embeddings": "max_position_embeddings",
              "type_vocab_size": "type_vocab_size", "layer_norm_eps": "layer_norm_eps",
              "pad_token_id": "pad_token_id"}
    values = {ours: hf[theirs] for ours, theirs in fields.items() if hf.get(theirs) is not None}
    act = hf.get("hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"{path_or_id}: hidden_act={act!r} is not supported (only 'gelu')")
    return dataclasses.replace(base, **values)


def _read_hf_config(path_or_id: str) -> dict:
    path = Path(path_or_id)
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face checkpoint)")
        return json.loads(config.read_text())
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path_or_id).to_dict()


def load_hf_weights(path_or_id: str) -> dict[str, torch.Tensor]:
    """The raw state dict of a Hugging Face checkpoint: a local directory or a hub id."""
    path = Path(path_or_id)
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(path_or_id, allow_patterns=["*.json", "*.safetensors",
                                                                  "*.bin"]))
    safetensors = sorted(path.glob("*.safetensors"))
    if safetensors:
        from safetensors.torch import load_file

        state = {}
        for file in safetensors:
            state.update(load_file(str(file)))
        return state
    bins = sorted(path.glob("pytorch_model*.bin"))
    if not bins:
        raise FileNotFoundError(f"{path}: no *.safetensors or pytorch_model*.bin weights")
    state = {}
    for file in bins:
        state.update(torch.load(file, map_location="cpu", weights_only=True))
    return state


def load_pretrained(encoder: BertEncoder, path_or_id: str) -> None:
    """Load a Hugging Face BERT checkpoint strictly (the pooler only where the layout has one)."""
    state = convert_hf_state_dict(load_hf_weights(path_or_id))
    if encoder.pooler is None:
        state = {k: v for k, v in state.items() if not k.startswith("pooler.")}
    result = encoder.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{path_or_id}: checkpoint does not fit text tower: missing "
                         f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
