"""Towers: BERT parity with transformers, ResNet layout and weights, ViT, layouts, switches."""

import warnings

import pytest
import torch
from torch import nn

from prior_dist.models import attention as attention_module
from prior_dist.models.bert import BertEncoder
from prior_dist.models.config import ImageTowerConfig, TextTowerConfig
from prior_dist.models.decoders import SentencePrototypeDecoder
from prior_dist.models.features import map_to_tokens, tokens_to_map
from prior_dist.models.norms import apex_fused_layer_norm, layer_norm
from prior_dist.models.resnet import ResNetBackbone, ResNetTower
from prior_dist.models.state_dict import bert_from_hf
from prior_dist.models.text import TextTower
from prior_dist.models.vit import ViTTower


def _hf_bert(seed=0):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=120,
        hidden_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=96,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = BertModel(config).eval()
    with torch.no_grad():  # non-trivial LayerNorm and bias values
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def _padded_inputs():
    torch.manual_seed(1)
    ids = torch.randint(1, 120, (3, 17))
    mask = torch.ones(3, 17, dtype=torch.long)
    mask[1, 9:] = 0
    mask[2, 4:] = 0
    ids[mask == 0] = 0
    return ids, mask


def _relative_error(a, b):
    return float((a - b).norm() / b.norm())


def test_bert_matches_transformers_with_padding():
    hf = _hf_bert()
    ours = BertEncoder(
        TextTowerConfig(
            vocab_size=120,
            hidden_size=48,
            num_layers=3,
            num_heads=4,
            intermediate_size=96,
            max_position_embeddings=64,
            dropout=0.0,
            attention_impl="sdpa",
        ),
        with_pooler=True,
    )
    ours.load_state_dict(bert_from_hf(hf.state_dict()), strict=True)
    ours.eval()
    ids, mask = _padded_inputs()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        got = ours(ids, mask)
    real = mask.bool()
    assert _relative_error(got[real], expected[real]) <= 1e-5
    # Each real row separately, so a short report cannot hide behind a long one.
    for b in range(3):
        assert _relative_error(got[b][real[b]], expected[b][real[b]]) <= 1e-5


def test_text_tower_loads_a_local_hf_checkpoint_strictly(tmp_path):
    hf = _hf_bert(seed=3)
    hf.save_pretrained(tmp_path / "bert")
    tower = TextTower(
        TextTowerConfig(pretrained=str(tmp_path / "bert"), dropout=0.0, attention_impl="sdpa"),
        embed_dim=16,
    ).eval()
    assert tower.cfg.hidden_size == 48 and tower.cfg.num_layers == 3 and tower.cfg.vocab_size == 120
    ids, mask = _padded_inputs()
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        got = tower.bert(ids, mask)
    assert _relative_error(got[mask.bool()], expected[mask.bool()]) <= 1e-5
    # A checkpoint that does not fit is refused, not half-loaded.
    state = hf.state_dict()
    state["encoder.layer.0.attention.self.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected parameter"):
        bert_from_hf(state)


def test_attention_impl_flash_raises_without_package_and_auto_warns_once(monkeypatch):
    if attention_module.flash_attn_module() is not None and torch.cuda.is_available():
        pytest.skip("flash-attn is usable here")
    with pytest.raises(RuntimeError, match="attention_impl='flash'"):
        attention_module.resolve_attention_impl("flash", torch.device("cpu"))
    monkeypatch.setattr(attention_module, "_WARNED", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            assert attention_module.resolve_attention_impl("auto", torch.device("cpu")) == "sdpa"
    assert len([w for w in caught if "flash-attn" in str(w.message)]) == 1
    with pytest.raises(ValueError, match="attention_impl"):
        attention_module.resolve_attention_impl("fast", torch.device("cpu"))


def test_apex_probe_falls_back_to_native_layer_norm():
    norm = layer_norm(8)
    if apex_fused_layer_norm() is None or not torch.cuda.is_available():
        assert type(norm) is nn.LayerNorm
    assert set(dict(norm.named_parameters())) == {"weight", "bias"}


def test_resnet50_has_torchvision_layout_and_loads_imagenet_with_summed_stem(tmp_path):
    from torchvision.models import resnet50

    torch.manual_seed(0)
    reference = resnet50()
    ours = ResNetBackbone(ImageTowerConfig())
    theirs = {k: v.shape for k, v in reference.state_dict().items() if not k.startswith("fc.")}
    mine = {k: v.shape for k, v in ours.state_dict().items()}
    assert set(mine) == set(theirs)
    assert all(mine[k] == theirs[k] for k in mine if k != "conv1.weight")
    assert mine["conv1.weight"] == (64, 1, 7, 7)
    assert sum(p.numel() for p in ours.parameters()) == 23_501_760
    path = tmp_path / "imagenet.pth"
    torch.save(reference.state_dict(), path)
    tower = ResNetTower(ImageTowerConfig(pretrained=str(path)), embed_dim=32)
    torch.testing.assert_close(
        tower.backbone.conv1.weight, reference.conv1.weight.sum(dim=1, keepdim=True)
    )
    torch.testing.assert_close(
        tower.backbone.layer3[2].conv2.weight, reference.layer3[2].conv2.weight
    )
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7)}, path)
    with pytest.raises(ValueError, match="missing"):
        ResNetTower(ImageTowerConfig(pretrained=str(path)), embed_dim=32)


def test_token_layout_moves_a_planted_pattern_to_the_right_token():
    channels, h, w = 6, 3, 4
    feature_map = torch.zeros(1, channels, h, w)
    pattern = torch.arange(1.0, channels + 1)
    feature_map[0, :, 2, 1] = pattern  # location (row 2, column 1)
    spatial = map_to_tokens(feature_map, "spatial")
    assert spatial.shape == (1, h * w, channels)
    torch.testing.assert_close(spatial[0, 2 * w + 1], pattern)
    assert spatial[0].abs().sum(1).nonzero().flatten().tolist() == [2 * w + 1]
    # The reference view scatters the location's vector over several tokens instead.
    reference = map_to_tokens(feature_map, "reference_view")
    assert len(reference[0].abs().sum(1).nonzero()) > 1
    for layout in ("spatial", "reference_view"):
        torch.testing.assert_close(
            tokens_to_map(map_to_tokens(feature_map, layout), (h, w), layout), feature_map
        )


def test_vit_tower_contract_and_activation_checkpointing_matches():
    cfg = ImageTowerConfig(
        arch="vit",
        image_size=32,
        patch_size=8,
        vit_depth=2,
        vit_width=16,
        vit_heads=2,
        attention_impl="sdpa",
    )
    torch.manual_seed(0)
    plain = ViTTower(cfg, embed_dim=12)
    torch.manual_seed(0)
    ckpt = ViTTower(ImageTowerConfig(**{**cfg.__dict__, "activation_checkpointing": True}), 12)
    x = torch.randn(2, 1, 32, 32)
    a, b = plain(x), ckpt(x)
    assert a.global_embedding.shape == (2, 12) and a.patch_tokens.shape == (2, 16, 12)
    assert a.grid == (4, 4)
    (a.global_embedding.sum() + a.patch_tokens.sum()).backward()
    (b.global_embedding.sum() + b.patch_tokens.sum()).backward()
    for p, q in zip(plain.parameters(), ckpt.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    with pytest.raises(ValueError, match="patch grid"):
        plain(torch.randn(1, 1, 40, 40))


@pytest.mark.parametrize("tower", ["resnet", "bert"])
def test_activation_checkpointing_gives_the_same_gradients(tower):
    def build(flag):
        torch.manual_seed(0)
        if tower == "resnet":
            return ResNetTower(
                ImageTowerConfig(
                    image_size=32,
                    block="basic",
                    layers=(1, 1, 1, 1),
                    width=4,
                    pool_heads=2,
                    activation_checkpointing=flag,
                ),
                8,
            )
        return TextTower(
            TextTowerConfig(
                vocab_size=50,
                hidden_size=16,
                num_layers=2,
                num_heads=2,
                intermediate_size=32,
                activation_checkpointing=flag,
            ),
            8,
        )

    torch.manual_seed(1)
    image = torch.randn(2, 1, 32, 32)
    ids = torch.randint(1, 50, (2, 6))
    index = torch.tensor([[-1, 0, 0, 1, 1, -1]] * 2)
    grads = []
    for flag in (False, True):
        model = build(flag)
        torch.manual_seed(2)  # same dropout masks: checkpointing replays the RNG state
        if tower == "resnet":
            out = model(image)
            loss = out.global_embedding.square().sum() + out.patch_tokens.square().sum()
        else:
            out = model(ids, torch.ones_like(ids), index)
            loss = out.sentences.square().sum()
        loss.backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("causal", [False, True])
def test_decoder_mask_switch(causal):
    torch.manual_seed(0)
    decoder = SentencePrototypeDecoder(
        16,
        num_queries=5,
        layers=2,
        heads=2,
        intermediate=32,
        dropout=0.0,
        max_positions=8,
        causal=causal,
    )
    memory = torch.randn(2, 7, 16)
    before = decoder(memory)
    with torch.no_grad():
        decoder.queries[4].add_(torch.randn(16))  # change the last query only
    after = decoder(memory)
    first_rows_changed = not torch.allclose(before[:, :4], after[:, :4])
    # Non-autoregressive (the method): every query sees every other; causal (the quirk): not.
    assert first_rows_changed is (not causal)
    assert not torch.allclose(before[:, 4], after[:, 4])
