"""Every translation between our parameter names and other libraries', in both directions.

One table per library, read one way to import and the other way to export:
- BERT <-> Hugging Face `BertModel` (q/k/v split in theirs, fused `qkv` in ours), and the
  config fields;
- ViT tower <-> timm `VisionTransformer`;
- ResNet backbone <-> torchvision `ResNet` (1-channel conv1, no `fc`);
- the whole `PriorModel` <-> an export directory's three parts (image encoder, Hugging Face
  text encoder, heads).
"""

from __future__ import annotations

import dataclasses
import json

import torch
from safetensors.torch import load_file

from prior_dist.data.hub import resolve_pretrained
from prior_dist.models.config import ImageTowerConfig, ModelConfig, TextTowerConfig

State = dict[str, torch.Tensor]

# --- BERT <-> Hugging Face ---------------------------------------------------------------------

# Hugging Face BertModel module names -> ours; q/k/v are fused into `qkv`.
_BERT_LAYER = {
    "attention.output.dense": "attn_out",
    "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "ffn_in",
    "output.dense": "ffn_out",
    "output.LayerNorm": "ffn_norm",
}
_BERT_TOP = {
    "embeddings.word_embeddings": "word_embeddings",
    "embeddings.position_embeddings": "position_embeddings",
    "embeddings.token_type_embeddings": "token_type_embeddings",
    "embeddings.LayerNorm": "embed_norm",
    "pooler.dense": "pooler",
}
_QKV = ("query", "key", "value")
# Present in Hugging Face checkpoints, never part of an encoder.
_BERT_IGNORED = ("cls.", "embeddings.position_ids")
# TextTowerConfig field -> Hugging Face BertConfig field.
_BERT_CONFIG = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "intermediate_size": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings",
    "type_vocab_size": "type_vocab_size",
    "layer_norm_eps": "layer_norm_eps",
    "pad_token_id": "pad_token_id",
}


def bert_from_hf(hf: State) -> State:
    """A `BertModel` / `BertForPreTraining` state dict in our layout; unknown keys raise."""
    out, qkv, unknown = {}, {}, []
    for key, value in hf.items():
        key = key.removeprefix("bert.")
        key = key.replace(".gamma", ".weight").replace(".beta", ".bias")  # old TF exports
        if key.startswith(_BERT_IGNORED):
            continue
        stem, _, leaf = key.rpartition(".")
        if stem in _BERT_TOP:
            out[f"{_BERT_TOP[stem]}.{leaf}"] = value
            continue
        parts = stem.split(".")
        if len(parts) >= 4 and parts[0] == "encoder" and parts[1] == "layer":
            index, inner = parts[2], ".".join(parts[3:])
            if inner in {f"attention.self.{p}" for p in _QKV}:
                qkv.setdefault((index, leaf), {})[inner.rsplit(".", 1)[1]] = value
                continue
            if inner in _BERT_LAYER:
                out[f"layers.{index}.{_BERT_LAYER[inner]}.{leaf}"] = value
                continue
        unknown.append(key)
    if unknown:
        more = " ..." if len(unknown) > 5 else ""
        raise ValueError(f"BERT checkpoint: unexpected parameter(s) {unknown[:5]}{more}")
    for (index, leaf), parts in qkv.items():
        if set(parts) != set(_QKV):
            raise ValueError(f"BERT checkpoint: layer {index} lacks one of query/key/value.{leaf}")
        out[f"layers.{index}.qkv.{leaf}"] = torch.cat([parts[p] for p in _QKV])
    return out


def bert_to_hf(state: State) -> State:
    """Our BERT encoder's state dict in Hugging Face `BertModel` names (q/k/v split again)."""
    top = {ours: theirs for theirs, ours in _BERT_TOP.items()}
    layer = {ours: theirs for theirs, ours in _BERT_LAYER.items()}
    out = {}
    for key, value in state.items():
        stem, _, leaf = key.rpartition(".")
        if stem in top:
            out[f"{top[stem]}.{leaf}"] = value
            continue
        _, index, name = stem.split(".", 2)
        if name == "qkv":
            for part, chunk in zip(_QKV, value.chunk(3, dim=0)):
                out[f"encoder.layer.{index}.attention.self.{part}.{leaf}"] = chunk.contiguous()
        else:
            out[f"encoder.layer.{index}.{layer[name]}.{leaf}"] = value
    return out


def bert_config_from_hf(hf: dict, base: TextTowerConfig, where: str) -> TextTowerConfig:
    """`base` with the shape fields of a Hugging Face BERT config dict."""
    values = {
        ours: hf[theirs] for ours, theirs in _BERT_CONFIG.items() if hf.get(theirs) is not None
    }
    act = hf.get("hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"{where}: hidden_act={act!r} is not supported (only 'gelu')")
    return dataclasses.replace(base, **values)


def hf_bert_config(text_cfg: TextTowerConfig):
    """The Hugging Face `BertConfig` of our text tower."""
    from transformers import BertConfig  # heavy: only exports need it

    fields = {theirs: getattr(text_cfg, ours) for ours, theirs in _BERT_CONFIG.items()}
    return BertConfig(
        **fields,
        hidden_dropout_prob=text_cfg.dropout,
        attention_probs_dropout_prob=text_cfg.dropout,
    )


def read_hf_config(path_or_id: str, field: str = "model.text.pretrained") -> dict:
    """A Hugging Face `config.json` as a dict, from a local directory or a hub id."""
    path = resolve_pretrained(path_or_id, field)
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{path}: no config.json (not a Hugging Face checkpoint)")
    return json.loads(config.read_text())


def load_hf_weights(path_or_id: str, field: str = "model.text.pretrained") -> State:
    """The raw state dict of a Hugging Face checkpoint: a local directory or a hub id (cached,
    or downloaded when online; never unpickled: safetensors, or `torch.load(weights_only=True)`)."""
    path = resolve_pretrained(path_or_id, field)
    state = {}
    safetensors = sorted(path.glob("*.safetensors"))
    if safetensors:
        for file in safetensors:
            state.update(load_file(str(file)))
        return state
    bins = sorted(path.glob("pytorch_model*.bin"))
    if not bins:
        raise FileNotFoundError(f"{path}: no *.safetensors or pytorch_model*.bin weights")
    for file in bins:
        state.update(torch.load(file, map_location="cpu", weights_only=True))
    return state


# --- ViT tower <-> timm ------------------------------------------------------------------------

# (ours, timm's) substrings; the first applies to `patch_embed.` keys, the rest inside blocks.
_VIT_RENAMES = (
    ("patch_embed.", "patch_embed.proj."),
    (".qkv.", ".attn.qkv."),
    (".proj.", ".attn.proj."),
    (".fc1.", ".mlp.fc1."),
    (".fc2.", ".mlp.fc2."),
)
_TOWER_PROJECTIONS = ("local_proj.", "global_proj.")


def vit_to_timm(tower_state: State) -> State:
    """Our ViT tower's encoder weights (no projections) in timm `VisionTransformer` names."""
    out = {}
    for key, value in tower_state.items():
        if key.startswith(_TOWER_PROJECTIONS):
            continue
        if key.startswith("patch_embed."):
            key = key.replace(*_VIT_RENAMES[0], 1)
        elif key.startswith("blocks."):
            for ours, theirs in _VIT_RENAMES[1:]:
                key = key.replace(ours, theirs, 1)
        out[key] = value
    return out


def timm_to_vit(state: State) -> State:
    out = {}
    for key, value in state.items():
        for ours, theirs in _VIT_RENAMES:
            key = key.replace(theirs, ours, 1)
        out[key] = value
    return out


def timm_arguments(image_cfg: ImageTowerConfig) -> dict:
    """`timm.models.vision_transformer.VisionTransformer(**these)` loads the export strictly."""
    return {
        "img_size": image_cfg.image_size,
        "patch_size": image_cfg.patch_size,
        "in_chans": 1,
        "num_classes": 0,
        "embed_dim": image_cfg.vit_width,
        "depth": image_cfg.vit_depth,
        "num_heads": image_cfg.vit_heads,
        "mlp_ratio": image_cfg.vit_mlp_ratio,
        "qkv_bias": True,
        "class_token": True,
        "global_pool": "token",
    }


# --- ResNet backbone <-> torchvision -----------------------------------------------------------

_TORCHVISION_RESNETS = {
    ("bottleneck", (3, 4, 6, 3)): "resnet50",
    ("bottleneck", (3, 4, 23, 3)): "resnet101",
    ("basic", (2, 2, 2, 2)): "resnet18",
    ("basic", (3, 4, 6, 3)): "resnet34",
}


def resnet_constructors(image_cfg: ImageTowerConfig) -> dict:
    """How to build a module that loads the exported ResNet image encoder with `strict=True`.

    At width 64: timm's `ResNet(**timm_resnet)` for any depth (`block` named by its class in
    `timm.models.resnet`), and the torchvision call for a stock depth. Other widths (the demo's
    16, tiny's 4) have no stock constructor, as both libraries fix the stem at 64 channels;
    `prior_dist` builds them from the card's image config."""
    ours = (
        "prior_dist.models.resnet.ResNetBackbone(prior_dist.models.config.ImageTowerConfig("
        '**model_card["model_config"]["image"]))'
    )
    if image_cfg.width != 64:
        return {"prior_dist": ours, "note": "no torchvision or timm constructor for this width"}
    out = {
        "prior_dist": ours,
        "timm_resnet": {
            "block": "Bottleneck" if image_cfg.block == "bottleneck" else "BasicBlock",
            "layers": list(image_cfg.layers),
            "in_chans": 1,
            "num_classes": 0,
        },
    }
    name = _TORCHVISION_RESNETS.get((image_cfg.block, tuple(image_cfg.layers)))
    if name:
        out["torchvision"] = (
            f"m = torchvision.models.{name}(); m.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, "
            "bias=False); m.fc = torch.nn.Identity()"
        )
    return out


def resnet_from_torchvision(state: State) -> State:
    """A torchvision `ResNet` state dict (a `state_dict` wrapper and DataParallel's `module.`
    allowed) for our 1-channel backbone: `fc` dropped, an RGB conv1 summed over colour."""
    if "state_dict" in state:
        state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    # The authors' released image encoder (`prior_resnet50.pt`): their ResNet wrapper keeps
    # torchvision's module as `encoder` beside its attention pool (not part of a backbone).
    for prefix in ("image_encoder.encoder.", "encoder."):
        if any(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
            break
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    conv1 = state.get("conv1.weight")
    if conv1 is not None and conv1.shape[1] == 3:
        state["conv1.weight"] = conv1.sum(dim=1, keepdim=True)
    return state


# --- PriorModel <-> export parts ---------------------------------------------------------------

_BERT_PREFIX = "text.bert."


def split_for_export(state: State, cfg: ModelConfig) -> tuple[State, State, State]:
    """(image encoder in torchvision's or timm's layout, text encoder in Hugging Face names,
    heads: every other parameter under our own names)."""
    if cfg.image.arch == "vit":
        tower = {k.removeprefix("image."): v for k, v in state.items() if k.startswith("image.")}
        image = vit_to_timm(tower)
        used = {f"image.{k}" for k in tower if not k.startswith(_TOWER_PROJECTIONS)}
    else:
        prefix = "image.backbone."
        image = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        used = {f"{prefix}{k}" for k in image}
    bert = {k.removeprefix(_BERT_PREFIX): v for k, v in state.items() if k.startswith(_BERT_PREFIX)}
    heads = {k: v for k, v in state.items() if k not in used and not k.startswith(_BERT_PREFIX)}
    return image, bert_to_hf(bert), heads


def join_from_export(image: State, hf_bert: State, heads: State, cfg: ModelConfig) -> State:
    """The `PriorModel` state dict from the three export parts (inverse of `split_for_export`)."""
    if cfg.image.arch == "vit":
        state = {f"image.{k}": v for k, v in timm_to_vit(image).items()}
    else:
        state = {f"image.backbone.{k}": v for k, v in image.items()}
    state.update(heads)
    bert = bert_from_hf(hf_bert)
    if not cfg.compat.reference_unused_params:
        bert = {k: v for k, v in bert.items() if not k.startswith("pooler.")}
    state.update({f"{_BERT_PREFIX}{k}": v for k, v in bert.items()})
    return state


# --- PriorModel (reference layout) <-> the authors' released `Prior` module ---------------------

# Their module prefix -> ours, for the parts whose inner names agree (checked against their
# code: torchvision ResNet `encoder`, CLIP-style attention pools, plain Linear layers).
_REFERENCE_PREFIXES = {
    "image_encoder.encoder.": "image.backbone.",
    "image_encoder.atten_pool.": "image.attention_pool.",
    "global_image_projection.": "image.global_proj.",
    "local_image_projection.": "image.local_proj.",
    "local_text_projection.": "text.token_proj.",
    "global_text_projection.": "text.global_proj.",
    "global_text_attention.": "report_pool.",
    "predictor.": "predictor.net.",
}
# Their LocalCrossAttention: the `1` projections act on image patches, the `2` on sentences.
_REFERENCE_LOCAL = {
    "query1": "image_query",
    "key1": "image_key",
    "value1": "image_value",
    "query2": "text_query",
    "key2": "text_key",
    "value2": "text_value",
}
# Their image decoder block: Conv2dReLU = Sequential(conv, BatchNorm, ReLU), twice.
_REFERENCE_DECODER_BLOCK = {"conv1.0": "1", "conv1.1": "2", "conv2.0": "4", "conv2.1": "5"}
# Their sentence decoder (a Hugging Face BertModel with cross-attention) -> ours.
_DECODER_LAYER = {
    "attention.output.dense": "self_out",
    "attention.output.LayerNorm": "self_norm",
    "crossattention.self.query": "cross_q",
    "crossattention.output.dense": "cross_out",
    "crossattention.output.LayerNorm": "cross_norm",
    "intermediate.dense": "ffn_in",
    "output.dense": "ffn_out",
    "output.LayerNorm": "ffn_norm",
}
_DECODER_TOP = {
    "embeddings.word_embeddings": "word_embeddings",
    "embeddings.position_embeddings": "position_embeddings",
    "embeddings.token_type_embeddings": "token_type_embeddings",
    "embeddings.LayerNorm": "embed_norm",
}
_REFERENCE_SCALARS = {
    "logit_scale": "logit_scales.global_log_scale",
    "local_logit_scale": "logit_scales.local_log_scale",
    "sentence_bank.embed.weight": "prototype_bank.prototypes",
}
_REFERENCE_IGNORED = ("text_encoder.encoder.embeddings.position_ids",)


def prior_from_reference(theirs: State) -> State:
    """The authors' `Prior` state dict (their Lightning checkpoint's `state_dict`) in our
    reference-layout names; fused q/k/v where ours are fused. Keys we do not know are
    returned by name in a ValueError, never dropped."""
    out, fused, unknown = {}, {}, []
    bert = {}
    for key, value in theirs.items():
        if key in _REFERENCE_IGNORED or key.endswith(".position_ids"):
            continue
        if key in _REFERENCE_SCALARS:
            out[_REFERENCE_SCALARS[key]] = value.reshape(-1) if value.dim() == 0 else value
        elif key == "prototype_queries":
            out["sentence_decoder.queries"] = value.reshape(value.shape[-2], value.shape[-1])
        elif key.startswith("text_encoder.encoder."):
            bert[key.removeprefix("text_encoder.encoder.")] = value
        elif key.startswith("sentence_decoder."):
            if not _decoder_key(key.removeprefix("sentence_decoder."), value, out, fused):
                unknown.append(key)
        elif not _plain_key(key, value, out):
            unknown.append(key)
    if unknown:
        more = " ..." if len(unknown) > 5 else ""
        raise ValueError(f"authors' checkpoint: unexpected key(s) {unknown[:5]}{more}")
    out.update({f"text.bert.{k}": v for k, v in bert_from_hf(bert).items()})
    for (index, name, leaf), parts in fused.items():
        order = ("query", "key", "value") if name == "self_qkv" else ("key", "value")
        if set(parts) != set(order):
            raise ValueError(f"authors' checkpoint: decoder layer {index} lacks part of {name}")
        out[f"sentence_decoder.layers.{index}.{name}.{leaf}"] = torch.cat([parts[p] for p in order])
    return out


def _plain_key(key: str, value: torch.Tensor, out: State) -> bool:
    """Prefix-renamed parts, the local cross-attention and the image decoder."""
    for theirs, ours in _REFERENCE_PREFIXES.items():
        if key.startswith(theirs):
            out[ours + key.removeprefix(theirs)] = value
            return True
    parts = key.split(".")
    if parts[0] == "local_cross_attention" and len(parts) == 3 and parts[1] in _REFERENCE_LOCAL:
        out[f"local_alignment.{_REFERENCE_LOCAL[parts[1]]}.{parts[2]}"] = value
        return True
    if key.startswith("image_decoder.output_head.0."):
        out["image_decoder.head." + parts[-1]] = value
        return True
    if parts[:2] == ["image_decoder", "blocks"] and len(parts) == 6:
        inner = ".".join(parts[3:5])
        if inner in _REFERENCE_DECODER_BLOCK:
            out[f"image_decoder.blocks.{parts[2]}.{_REFERENCE_DECODER_BLOCK[inner]}.{parts[5]}"] = (
                value
            )
            return True
    return False


def _decoder_key(key: str, value: torch.Tensor, out: State, fused: dict) -> bool:
    stem, _, leaf = key.rpartition(".")
    if stem in _DECODER_TOP:
        out[f"sentence_decoder.{_DECODER_TOP[stem]}.{leaf}"] = value
        return True
    parts = stem.split(".")
    if len(parts) < 4 or parts[:2] != ["encoder", "layer"]:
        return False
    index, inner = parts[2], ".".join(parts[3:])
    if inner in _DECODER_LAYER:
        out[f"sentence_decoder.layers.{index}.{_DECODER_LAYER[inner]}.{leaf}"] = value
        return True
    for block, name in (("attention.self.", "self_qkv"), ("crossattention.self.", "cross_kv")):
        part = inner.removeprefix(block)
        if inner.startswith(block) and part in ("query", "key", "value"):
            fused.setdefault((index, name, leaf), {})[part] = value
            return True
    return False


def prior_to_reference(ours: State) -> State:
    """Our reference-layout `PriorModel` state dict in the authors' `Prior` names (the inverse
    of `prior_from_reference`)."""
    reverse_prefix = {o: t for t, o in _REFERENCE_PREFIXES.items()}
    reverse_scalar = {o: t for t, o in _REFERENCE_SCALARS.items()}
    reverse_local = {o: t for t, o in _REFERENCE_LOCAL.items()}
    reverse_block = {o: t for t, o in _REFERENCE_DECODER_BLOCK.items()}
    reverse_top = {o: t for t, o in _DECODER_TOP.items()}
    reverse_layer = {o: t for t, o in _DECODER_LAYER.items()}
    out, bert = {}, {}
    for key, value in ours.items():
        parts = key.split(".")
        if key in reverse_scalar:
            out[reverse_scalar[key]] = value.reshape(()) if "log_scale" in key else value
        elif key == "sentence_decoder.queries":
            out["prototype_queries"] = value.unsqueeze(0)
        elif key.startswith("text.bert."):
            bert[key.removeprefix("text.bert.")] = value
        elif parts[0] == "local_alignment":
            out[f"local_cross_attention.{reverse_local[parts[1]]}.{parts[2]}"] = value
        elif key.startswith("image_decoder.head."):
            out["image_decoder.output_head.0." + parts[-1]] = value
        elif key.startswith("image_decoder.blocks."):
            out[f"image_decoder.blocks.{parts[2]}.{reverse_block[parts[3]]}.{parts[4]}"] = value
        elif key.startswith("sentence_decoder."):
            stem, leaf = ".".join(parts[1:-1]), parts[-1]
            if stem in reverse_top:
                out[f"sentence_decoder.{reverse_top[stem]}.{leaf}"] = value
                continue
            index, name = parts[2], parts[3]
            where = f"sentence_decoder.encoder.layer.{index}"
            if name in ("self_qkv", "cross_kv"):
                block = "attention.self" if name == "self_qkv" else "crossattention.self"
                names = ("query", "key", "value") if name == "self_qkv" else ("key", "value")
                for part, chunk in zip(names, value.chunk(len(names))):
                    out[f"{where}.{block}.{part}.{leaf}"] = chunk.contiguous()
            else:
                out[f"{where}.{reverse_layer[name]}.{leaf}"] = value
        else:
            prefix = next(p for p in reverse_prefix if key.startswith(p))
            out[reverse_prefix[prefix] + key.removeprefix(prefix)] = value
    out.update({f"text_encoder.encoder.{k}": v for k, v in bert_to_hf(bert).items()})
    return out
