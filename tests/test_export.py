"""Export round trips: torchvision, transformers and our own loader give the same embeddings."""

import pytest
import timm.models.resnet as timm_resnet
import torch
from torch import nn
from torchvision.models import resnet50

from prior_dist.models import build_model, model_config
from prior_dist.models.config import ImageTowerConfig
from prior_dist.models.resnet import ResNetBackbone
from prior_dist.models.state_dict import resnet_constructors
from prior_dist.runs import LoadedModel, export_model, load_export, load_model
from tests.conftest import run_cli
from tests.model_batch import ragged_batch
from tests.pretrain_runs import ds_config, launch


def test_export_of_a_run_round_trips(tmp_path, tokenizer):
    from prior_dist.preparation.provision import provide_phantom_shards
    from prior_dist.training.recipe import load_recipe

    shards = tmp_path / "shards"
    recipe, _ = load_recipe("tiny", [f"data.path={shards}"])
    provide_phantom_shards(recipe.data, log=lambda _: None)
    run = tmp_path / "run"
    launch(1, ds_config(tmp_path, 8), run, shards, "--max-steps", "2")
    out = tmp_path / "export"
    run_cli("prior_dist.export", "--checkpoint", str(run), "--out", str(out))
    original, exported = load_model(run), load_export(out)
    assert exported.info["training_steps"] == 2
    assert exported.info["data"]["manifest_sha256"]
    batch = ragged_batch(original.model.cfg, sentence_counts=(3, 1))
    with torch.no_grad():
        a = original.model.encode_image(batch["image"])
        b = exported.model.encode_image(batch["image"])
        assert torch.equal(a.global_embedding, b.global_embedding)
        assert torch.equal(a.patch_tokens, b.patch_tokens)
        ta = original.model.encode_text(
            batch["input_ids"], batch["attention_mask"], batch["sentence_index"]
        )
        tb = exported.model.encode_text(
            batch["input_ids"], batch["attention_mask"], batch["sentence_index"]
        )
        assert torch.equal(ta.sentences, tb.sentences)

    from transformers import AutoModel, AutoTokenizer

    hf = AutoModel.from_pretrained(str(out / "text_encoder")).eval()
    hf_tok = AutoTokenizer.from_pretrained(str(out / "text_encoder"))
    text = "There is a small right pleural effusion."
    assert hf_tok(text)["input_ids"] == original.tokenizer(text)["input_ids"]
    with torch.no_grad():
        expected = original.model.text.bert(batch["input_ids"], batch["attention_mask"])
        got = hf(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
    real = batch["attention_mask"].bool()
    assert float((got[real] - expected[real]).norm() / expected[real].norm()) < 1e-5


def test_resnet50_export_loads_strictly_into_torchvision(tmp_path, tokenizer):
    from safetensors.torch import load_file
    from torchvision.models import resnet50

    tiny = model_config("tiny")
    cfg = model_config("paper").replace(text=tiny.text, heads=tiny.heads)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    export_model(LoadedModel(model, tokenizer, "unit-test", {"step": 0}), tmp_path / "export")
    net = resnet50()
    net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    net.fc = nn.Identity()
    net.avgpool = nn.Identity()
    net.load_state_dict(
        load_file(str(tmp_path / "export" / "image_encoder.safetensors")), strict=True
    )
    net.eval()
    image = torch.randn(2, 1, 224, 224)
    with torch.no_grad():
        ours = model.image.backbone(image)
        theirs = net(image).view(2, 2048, 7, 7)
    torch.testing.assert_close(theirs, ours)


def test_vit_export_loads_strictly_into_timm_and_round_trips(tmp_path, tokenizer):
    timm = __import__("pytest").importorskip("timm")
    import json

    from safetensors.torch import load_file

    from prior_dist.models.config import ImageTowerConfig

    tiny = model_config("tiny")
    cfg = tiny.replace(
        image=ImageTowerConfig(
            arch="vit", image_size=32, patch_size=8, vit_depth=2, vit_width=32, vit_heads=2
        )
    )
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    out = export_model(LoadedModel(model, tokenizer, "unit-test", {"step": 0}), tmp_path / "e")
    card = json.loads((out / "model_card.json").read_text())
    net = timm.models.vision_transformer.VisionTransformer(**card["timm_vision_transformer"])
    net.load_state_dict(load_file(str(out / "image_encoder.safetensors")), strict=True)
    image = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            net.eval().forward_features(image), model.image._tokens(image), rtol=1e-5, atol=1e-5
        )
        back = load_export(out).model.encode_image(image)
        ours = model.encode_image(image)
    assert torch.equal(back.global_embedding, ours.global_embedding)
    assert torch.equal(back.patch_tokens, ours.patch_tokens)
    assert "timm VisionTransformer" in (out / "README.md").read_text()


@pytest.mark.parametrize("name", ["tiny", "demo", "paper"])
def test_the_model_card_constructors_build_modules_that_load_the_image_encoder(name):
    """Every constructor the card names loads the exported ResNet strictly and computes the
    same features: timm and torchvision at width 64 (paper), ours for the narrow towers."""
    cfg = model_config(name).image
    torch.manual_seed(0)
    ours = ResNetBackbone(cfg).eval()
    exported = {k: v.clone() for k, v in ours.state_dict().items()}
    constructors = resnet_constructors(cfg)
    image = torch.randn(1, 1, 64, 64)
    rebuilt = ResNetBackbone(ImageTowerConfig(**model_config(name).to_dict()["image"])).eval()
    rebuilt.load_state_dict(exported, strict=True)
    assert "ResNetBackbone" in constructors["prior_dist"]
    assert ("timm_resnet" in constructors) == ("torchvision" in constructors) == (name == "paper")
    if name != "paper":
        return
    args = dict(constructors["timm_resnet"])
    args["block"] = getattr(timm_resnet, args["block"])
    theirs = timm_resnet.ResNet(**args).eval()
    theirs.load_state_dict(exported, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(theirs.forward_features(image), ours.feature_pyramid(image)[32])
    assert constructors["torchvision"].startswith("m = torchvision.models.resnet50();")
    stock = resnet50()  # what the card's torchvision line says, built here
    stock.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    stock.fc = nn.Identity()
    stock.load_state_dict(exported, strict=True)
