"""`python -m prior_dist.export --checkpoint RUN_DIR --out DIR`: reusable encoders.

DIR holds:
- `image_encoder.safetensors`: the ResNet backbone in torchvision's layout (1-channel conv1, no
  `fc`): `m = torchvision.models.resnet50(); m.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False);
  m.fc = nn.Identity(); m.load_state_dict(load_file(...), strict=True)` for the paper model;
  a ViT tower in timm's `VisionTransformer` layout (`timm.create_model("vit_base_patch16_224",
  in_chans=1, num_classes=0)` for ViT-B/16 at 224 px; the model card gives the arguments);
- `text_encoder/`: a Hugging Face BERT directory (`AutoModel.from_pretrained`,
  `AutoTokenizer.from_pretrained`);
- `heads.safetensors`: projections, attention pools, local alignment, predictor, prototype bank,
  logit scales and the decoders (everything else of the model);
- `model_card.json` and `README.md`: the model config, data manifest hash, training steps and
  evaluation results.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import torch

IMAGE_FILE, HEADS_FILE, TEXT_DIR = "image_encoder.safetensors", "heads.safetensors", "text_encoder"


def bert_to_hf(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our BERT encoder's state dict in Hugging Face `BertModel` names (q/k/v split again)."""
    top = {"word_embeddings": "embeddings.word_embeddings",
           "position_embeddings": "embeddings.position_embeddings",
           "token_type_embeddings": "embeddings.token_type_embeddings",
           "embed_norm": "embeddings.LayerNorm", "pooler": "pooler.dense"}
    layer = {"attn_out": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
             "ffn_in": "intermediate.dense", "ffn_out": "output.dense",
             "ffn_norm": "output.LayerNorm"}
    out = {}
    for key, value in state.items():
        stem, _, leaf = key.rpartition(".")
        if stem in top:
            out[f"{top[stem]}.{leaf}"] = value
            continue
        _, index, name = stem.split(".", 2)
        if name == "qkv":
            for part, chunk in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                out[f"encoder.layer.{index}.attention.self.{part}.{leaf}"] = chunk.contiguous()
        else:
            out[f"encoder.layer.{index}.{layer[name]}.{leaf}"] = value
    return out


_VIT_RENAMES = (("patch_embed.", "patch_embed.proj."), (".qkv.", ".attn.qkv."),
                (".proj.", ".attn.proj."), (".fc1.", ".mlp.fc1."), (".fc2.", ".mlp.fc2."))


def vit_to_timm(tower_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our ViT tower's encoder weights (no projections) in timm `VisionTransformer` names."""
    out = {}
    for key, value in tower_state.items():
        if key.startswith(("local_proj.", "global_proj.")):
            continue
        if key.startswith("patch_embed."):
            key = key.replace("patch_embed.", "patch_embed.proj.", 1)
        elif key.startswith("blocks."):
            for ours, theirs in _VIT_RENAMES[1:]:
                key = key.replace(ours, theirs, 1)
        out[key] = value
    return out


def timm_to_vit(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        for ours, theirs in _VIT_RENAMES:
            key = key.replace(theirs, ours, 1)
        out[key] = value
    return out


def timm_arguments(image_cfg) -> dict:
    """`timm.models.vision_transformer.VisionTransformer(**these)` loads the export strictly."""
    return {"img_size": image_cfg.image_size, "patch_size": image_cfg.patch_size, "in_chans": 1,
            "num_classes": 0, "embed_dim": image_cfg.vit_width, "depth": image_cfg.vit_depth,
            "num_heads": image_cfg.vit_heads, "mlp_ratio": image_cfg.vit_mlp_ratio,
            "qkv_bias": True, "class_token": True, "global_pool": "token"}


def _image_state(state: dict[str, torch.Tensor], arch: str) -> tuple[dict, set]:
    """(the image encoder in its library's layout, the model keys it came from)."""
    if arch == "vit":
        tower = {k.removeprefix("image."): v for k, v in state.items() if k.startswith("image.")}
        image = vit_to_timm(tower)
        used = {f"image.{k}" for k in tower if not k.startswith(("local_proj.", "global_proj."))}
        return image, used
    image = {k.removeprefix("image.backbone."): v for k, v in state.items()
             if k.startswith("image.backbone.")}
    return image, {f"image.backbone.{k}" for k in image}


def _hf_config(text_cfg):
    from transformers import BertConfig

    return BertConfig(vocab_size=text_cfg.vocab_size, hidden_size=text_cfg.hidden_size,
                      num_hidden_layers=text_cfg.num_layers,
                      num_attention_heads=text_cfg.num_heads,
                      intermediate_size=text_cfg.intermediate_size,
                      max_position_embeddings=text_cfg.max_position_embeddings,
                      type_vocab_size=text_cfg.type_vocab_size,
                      layer_norm_eps=text_cfg.layer_norm_eps,
                      hidden_dropout_prob=text_cfg.dropout,
                      attention_probs_dropout_prob=text_cfg.dropout,
                      pad_token_id=text_cfg.pad_token_id)


def _sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export_model(loaded, out_dir: str | Path) -> Path:
    """Write the export directory for a `LoadedModel` (see the module docstring)."""
    from safetensors.torch import save_file

    model = loaded.model
    cfg = model.cfg
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    image, image_keys = _image_state(state, cfg.image.arch)
    bert = {k.removeprefix("text.bert."): v for k, v in state.items()
            if k.startswith("text.bert.")}
    heads = {k: v for k, v in state.items()
             if k not in image_keys and not k.startswith("text.bert.")}
    save_file(image, str(out / IMAGE_FILE))
    save_file(heads, str(out / HEADS_FILE))

    from transformers import BertModel

    hf_state = bert_to_hf(bert)
    hf = BertModel(_hf_config(cfg.text), add_pooling_layer="pooler.dense.weight" in hf_state)
    result = hf.load_state_dict(hf_state, strict=False)
    unexpected_missing = [k for k in result.missing_keys if "position_ids" not in k]
    if result.unexpected_keys or unexpected_missing:
        raise AssertionError(f"export: BERT conversion mismatch {result}")
    hf.save_pretrained(str(out / TEXT_DIR))
    loaded.tokenizer.save_pretrained(str(out / TEXT_DIR))

    info = dict(loaded.info)
    shards = Path(info.get("shards", ""))
    card = {"format": "prior_dist-export", "version": 1, "model_config": cfg.to_dict(),
            "files": {"image_encoder": IMAGE_FILE, "text_encoder": TEXT_DIR,
                      "heads": HEADS_FILE},
            "source": loaded.source, "training_steps": info.get("step"),
            "data": {"path": info.get("data_path"),
                     "manifest_sha256": _sha256(shards / "manifest.json")},
            "recipe": info.get("recipe"), "evaluation": info.get("eval"),
            "image_normalisation": {"mean": 0.4755, "std": 0.3011, "channels": 1,
                                    "size": cfg.image.image_size}}
    if cfg.image.arch == "vit":
        card["timm_vision_transformer"] = timm_arguments(cfg.image)
    tmp = out / "model_card.json.tmp"
    tmp.write_text(json.dumps(card, indent=2))
    os.replace(tmp, out / "model_card.json")
    (out / "README.md").write_text(_card_markdown(card))
    return out


def _card_markdown(card: dict) -> str:
    cfg = card["model_config"]
    evaluation = card.get("evaluation") or {}
    lines = [
        "# PRIOR encoders (prior_dist export)", "",
        f"- Source: `{card['source']}`, {card['training_steps']} optimizer steps",
        f"- Data: `{card['data']['path']}` (manifest sha256 `{card['data']['manifest_sha256']}`)",
        f"- Image tower: {_tower_words(cfg['image'])}, 1 channel, {cfg['image']['image_size']} "
        "px, normalised with mean 0.4755 and std 0.3011",
        f"- Text tower: BERT, {cfg['text']['num_layers']} layers, hidden "
        f"{cfg['text']['hidden_size']}, vocab {cfg['text']['vocab_size']}",
        f"- Embedding width {cfg['heads']['embed_dim']}, {cfg['heads']['num_prototypes']} "
        "sentence prototypes", "",
        "Files: `image_encoder.safetensors` ("
        + ("timm VisionTransformer layout: `VisionTransformer(**model_card.json"
           "[\"timm_vision_transformer\"])`" if cfg["image"]["arch"] == "vit" else
           "torchvision ResNet layout, conv1 with one input channel, no fc")
        + "), `text_encoder/` (Hugging Face BERT + tokenizer), `heads.safetensors` "
        "(the rest of the model), `model_card.json`.", ""]
    if evaluation:
        lines += ["## Evaluation", "", "```json", json.dumps(evaluation, indent=2), "```", ""]
    return "\n".join(lines)


def _tower_words(image_cfg: dict) -> str:
    if image_cfg["arch"] == "vit":
        return (f"ViT (patch {image_cfg['patch_size']}, depth {image_cfg['vit_depth']}, width "
                f"{image_cfg['vit_width']}, {image_cfg['vit_heads']} heads)")
    return (f"ResNet ({image_cfg['block']} blocks {image_cfg['layers']}, width "
            f"{image_cfg['width']})")


def import_state_dict(export_dir: Path, load_file) -> dict[str, torch.Tensor]:
    """The PriorModel state dict back from an export directory."""
    from prior_dist.models.bert import convert_hf_state_dict, load_hf_weights

    card = json.loads((export_dir / "model_card.json").read_text())
    image = load_file(str(export_dir / IMAGE_FILE))
    if card["model_config"]["image"]["arch"] == "vit":
        state = {f"image.{k}": v for k, v in timm_to_vit(image).items()}
    else:
        state = {f"image.backbone.{k}": v for k, v in image.items()}
    state.update(load_file(str(export_dir / HEADS_FILE)))
    bert = convert_hf_state_dict(load_hf_weights(str(export_dir / TEXT_DIR)))
    if not card["model_config"]["compat"]["reference_unused_params"]:
        bert = {k: v for k, v in bert.items() if not k.startswith("pooler.")}
    state.update({f"text.bert.{k}": v for k, v in bert.items()})
    return state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prior_dist.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="a run directory (its newest complete checkpoint) or a checkpoint "
                             "directory")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    from prior_dist.evaluation.load import load_model

    try:
        loaded = load_model(args.checkpoint)
        out = export_model(loaded, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"export: error: {err}", file=sys.stderr)
        return 2
    print(f"export: wrote {out} (from {loaded.source})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
