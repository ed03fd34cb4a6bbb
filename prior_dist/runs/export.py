"""The export directory: reusable encoders in their libraries' own layouts, and a model card.

DIR holds:
- `image_encoder.safetensors`: the ResNet backbone in torchvision's layout (1-channel conv1, no
  `fc`): `m = torchvision.models.resnet50(); m.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False);
  m.fc = nn.Identity(); m.load_state_dict(load_file(...), strict=True)` for the paper model; the
  model card's `image_encoder_constructors` gives the call for every shape (timm's `ResNet` at
  width 64, `prior_dist`'s `ResNetBackbone` for narrower towers such as the demo's);
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

import hashlib
import json
from pathlib import Path

from safetensors.torch import save_file

from prior_dist.atomic import write_json
from prior_dist.data.transforms import MIMIC_MEAN, MIMIC_STD
from prior_dist.models.state_dict import (
    hf_bert_config,
    resnet_constructors,
    split_for_export,
    timm_arguments,
)
from prior_dist.runs.layout import CARD_FILE, HEADS_FILE, IMAGE_FILE, TEXT_DIR


def _sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export_model(loaded, out_dir: str | Path) -> Path:
    """Write the export directory for a `LoadedModel` (see the module docstring)."""
    model = loaded.model
    cfg = model.cfg
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    image, hf_state, heads = split_for_export(state, cfg)
    save_file(image, str(out / IMAGE_FILE))
    save_file(heads, str(out / HEADS_FILE))
    # transformers' modeling code takes ~0.5 s to import and only an export needs it.
    from transformers import BertModel

    hf = BertModel(hf_bert_config(cfg.text), add_pooling_layer="pooler.dense.weight" in hf_state)
    result = hf.load_state_dict(hf_state, strict=False)
    unexpected_missing = [k for k in result.missing_keys if "position_ids" not in k]
    if result.unexpected_keys or unexpected_missing:
        raise AssertionError(f"export: BERT conversion mismatch {result}")
    hf.save_pretrained(str(out / TEXT_DIR))
    loaded.tokenizer.save_pretrained(str(out / TEXT_DIR))

    info = dict(loaded.info)
    shards = Path(info["shards"]) if info.get("shards") else None
    card = {
        "format": "prior_dist-export",
        "version": 1,
        "model_config": cfg.to_dict(),
        "files": {"image_encoder": IMAGE_FILE, "text_encoder": TEXT_DIR, "heads": HEADS_FILE},
        "source": loaded.source,
        "training_steps": info.get("step"),
        "data": {
            "path": info.get("data_path"),
            "manifest_sha256": _sha256(shards / "manifest.json") if shards else None,
        },
        "recipe": info.get("recipe"),
        "evaluation": info.get("eval"),
        "image_normalisation": {
            "mean": MIMIC_MEAN,
            "std": MIMIC_STD,
            "channels": 1,
            "size": cfg.image.image_size,
        },
    }
    if cfg.image.arch == "vit":
        card["timm_vision_transformer"] = timm_arguments(cfg.image)
    else:
        card["image_encoder_constructors"] = resnet_constructors(cfg.image)
    write_json(out / CARD_FILE, card)
    (out / "README.md").write_text(_card_markdown(card))
    return out


def _card_markdown(card: dict) -> str:
    cfg = card["model_config"]
    evaluation = card.get("evaluation") or {}
    lines = [
        "# PRIOR encoders (prior_dist export)",
        "",
        f"- Source: `{card['source']}`, {card['training_steps']} optimizer steps",
        f"- Data: `{card['data']['path']}` (manifest sha256 `{card['data']['manifest_sha256']}`)",
        f"- Image tower: {_tower_words(cfg['image'])}, 1 channel, {cfg['image']['image_size']} "
        f"px, normalised with mean {MIMIC_MEAN} and std {MIMIC_STD}",
        f"- Text tower: BERT, {cfg['text']['num_layers']} layers, hidden "
        f"{cfg['text']['hidden_size']}, vocab {cfg['text']['vocab_size']}",
        f"- Embedding width {cfg['heads']['embed_dim']}, {cfg['heads']['num_prototypes']} "
        "sentence prototypes",
        "",
        "Files: `image_encoder.safetensors` ("
        + (
            "timm VisionTransformer layout: `VisionTransformer(**model_card.json"
            '["timm_vision_transformer"])`'
            if cfg["image"]["arch"] == "vit"
            else "torchvision ResNet layout, conv1 with one input channel, no fc; "
            '`model_card.json["image_encoder_constructors"]` names the torchvision, timm or '
            "prior_dist call that builds a module loading it strictly"
        )
        + "), `text_encoder/` (Hugging Face BERT + tokenizer), `heads.safetensors` "
        "(the rest of the model), `model_card.json`.",
        "",
    ]
    if evaluation:
        lines += ["## Evaluation", "", "```json", json.dumps(evaluation, indent=2), "```", ""]
    return "\n".join(lines)


def _tower_words(image_cfg: dict) -> str:
    if image_cfg["arch"] == "vit":
        return (
            f"ViT (patch {image_cfg['patch_size']}, depth {image_cfg['vit_depth']}, width "
            f"{image_cfg['vit_width']}, {image_cfg['vit_heads']} heads)"
        )
    return f"ResNet ({image_cfg['block']} blocks {image_cfg['layers']}, width {image_cfg['width']})"
