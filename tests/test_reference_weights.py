"""The authors' released PRIOR checkpoints load into our reference layout.

Their key names and shapes are rebuilt here independently of our translation table, from the
libraries their code uses (torchvision's ResNet-50 with a 1-channel conv1 and no fc, Hugging
Face's `BertModel` for the text encoder and for the 8-layer cross-attention sentence decoder)
and from their own small modules (attention pools, projections, the local cross-attention
`query1 ... value2`, the SPB `embed`, the image decoder's conv-BN-ReLU blocks)."""

import re

import pytest
import torch
from torchvision.models import resnet50
from transformers import BertConfig, BertModel

from prior_dist.models import build_model, model_config
from prior_dist.models.state_dict import (
    prior_from_reference,
    prior_to_reference,
    resnet_from_torchvision,
)
from prior_dist.runs.load import load_reference


def _authors_layout(dim=768, vocab=28996, bank=512, queries=16) -> dict[str, tuple]:
    """Every key of their `Prior.state_dict()` for the paper configuration, with its shape."""
    shapes = {}
    with torch.device("meta"):
        backbone = resnet50()
        backbone.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
        backbone.fc = torch.nn.Identity()
        text = BertModel(BertConfig(vocab_size=vocab))
        decoder_cfg = BertConfig(
            vocab_size=vocab, num_hidden_layers=8, is_decoder=True, add_cross_attention=True
        )
        decoder = BertModel(decoder_cfg, add_pooling_layer=False)
    for prefix, module in (
        ("image_encoder.encoder.", backbone),
        ("text_encoder.encoder.", text),
        ("sentence_decoder.", decoder),
    ):
        shapes.update({prefix + k: tuple(v.shape) for k, v in module.state_dict().items()})

    def linear(name, out_features, in_features):
        shapes[f"{name}.weight"] = (out_features, in_features)
        shapes[f"{name}.bias"] = (out_features,)

    shapes["image_encoder.atten_pool.positional_embedding"] = (50, 2048)
    for p in ("q_proj", "k_proj", "v_proj", "c_proj"):
        linear(f"image_encoder.atten_pool.{p}", 2048, 2048)
        linear(f"global_text_attention.{p}", dim, dim)
    linear("global_image_projection", dim, 2048)
    linear("local_image_projection", dim, 2048)
    linear("global_text_projection", dim, 768)
    linear("local_text_projection", dim, 768)
    linear("predictor.0", dim // 2, dim)
    linear("predictor.2", dim, dim // 2)
    for p in ("query1", "key1", "value1", "query2", "key2", "value2"):
        linear(f"local_cross_attention.{p}", dim, dim)
    shapes["prototype_queries"] = (1, queries, dim)
    shapes["logit_scale"] = ()
    shapes["local_logit_scale"] = ()
    shapes["sentence_bank.embed.weight"] = (bank, dim)
    channels = 2 * dim
    for i in range(5):
        for conv, (cin, cout) in (
            ("conv1", (channels, channels // 2)),
            ("conv2", (channels // 2,) * 2),
        ):
            shapes[f"image_decoder.blocks.{i}.{conv}.0.weight"] = (cout, cin, 3, 3)
            for leaf in ("weight", "bias", "running_mean", "running_var"):
                shapes[f"image_decoder.blocks.{i}.{conv}.1.{leaf}"] = (cout,)
            shapes[f"image_decoder.blocks.{i}.{conv}.1.num_batches_tracked"] = ()
        channels //= 2
    shapes["image_decoder.output_head.0.weight"] = (1, channels, 3, 3)
    shapes["image_decoder.output_head.0.bias"] = (1,)
    return {k: v for k, v in shapes.items() if not k.endswith("position_ids")}


def test_our_reference_layout_has_exactly_the_authors_keys_and_shapes():
    with torch.device("meta"):
        ours = build_model(model_config("paper", "reference")).state_dict()
    theirs = {k: tuple(v.shape) for k, v in prior_to_reference(ours).items()}
    expected = _authors_layout()
    assert sorted(set(expected) - set(theirs)) == [] and sorted(set(theirs) - set(expected)) == []
    wrong = {k: (theirs[k], expected[k]) for k in expected if theirs[k] != expected[k]}
    assert wrong == {}
    # And back: the translation loses and invents nothing.
    back = prior_from_reference({k: torch.empty(v, device="meta") for k, v in expected.items()})
    assert {k: tuple(v.shape) for k, v in back.items()} == {
        k: tuple(v.shape) for k, v in ours.items()
    }


@pytest.fixture()
def tiny_reference(tmp_path, tokenizer):
    torch.manual_seed(0)
    cfg = model_config("tiny", "reference").for_vocabulary(len(tokenizer))
    model = build_model(cfg).eval()
    tokenizer.save_pretrained(str(tmp_path / "tokenizer"))
    return model, cfg, tmp_path


def test_a_lightning_checkpoint_in_the_authors_layout_round_trips(tiny_reference, tokenizer):
    model, cfg, tmp = tiny_reference
    ckpt = tmp / "prior.ckpt"
    state = {k: v.clone() for k, v in prior_to_reference(model.state_dict()).items()}
    torch.save({"epoch": 99, "global_step": 1234, "state_dict": state}, ckpt)
    loaded = load_reference(ckpt, str(tmp / "tokenizer"), base=cfg)
    image = torch.randn(2, 1, cfg.image.image_size, cfg.image.image_size)
    ids = torch.randint(5, len(tokenizer), (2, 12))
    mask = torch.ones_like(ids)
    sentence_index = torch.tensor([[0, 1, 1, 1, 2, 2, 2, 2, 3, 3, 0, 0]] * 2)
    with torch.no_grad():
        a, b = model.encode_image(image), loaded.model.encode_image(image)
        torch.testing.assert_close(b.global_embedding, a.global_embedding, rtol=0, atol=0)
        torch.testing.assert_close(b.patch_tokens, a.patch_tokens, rtol=0, atol=0)
        ta = model.encode_text(ids, mask, sentence_index, None)
        tb = loaded.model.encode_text(ids, mask, sentence_index, None)
        torch.testing.assert_close(tb.sentences, ta.sentences, rtol=0, atol=0)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key
    # The state dict saved alone (no Lightning wrapper) loads too.
    torch.save(state, tmp / "prior_state.pt")
    assert load_reference(tmp / "prior_state.pt", str(tmp / "tokenizer"), base=cfg).model


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda s: s.pop("local_cross_attention.query2.weight"), "missing"),
        (lambda s: s.__setitem__("extra_head.weight", torch.zeros(2)), "unexpected key"),
        (
            lambda s: s.__setitem__("sentence_bank.embed.weight", torch.zeros(3, 3)),
            "mis-shaped",
        ),
    ],
)
def test_missing_unexpected_or_misshaped_keys_are_refused_by_name(tiny_reference, change, words):
    model, cfg, tmp = tiny_reference
    state = prior_to_reference(model.state_dict())
    change(state)
    torch.save({"state_dict": state}, tmp / "bad.ckpt")
    with pytest.raises(ValueError, match=words) as err:
        load_reference(tmp / "bad.ckpt", str(tmp / "tokenizer"), base=cfg)
    assert "bad.ckpt" in str(err.value)
    named = re.findall(
        r"local_cross_attention|extra_head|prototype_bank|text_query", str(err.value)
    )
    assert named, str(err.value)


def test_translated_weights_compute_what_the_authors_modules_compute(tiny_reference):
    """Swapped halves would pass the key test (the shapes are symmetric): run their local
    cross-attention formula and a Hugging Face cross-attention `BertModel` decoder with the
    translated weights, against our modules."""
    model, cfg, _ = tiny_reference
    theirs = prior_to_reference(model.state_dict())
    heads = cfg.heads
    d = heads.embed_dim
    torch.manual_seed(3)
    patches, sentences = torch.randn(1, 9, d), torch.randn(1, 4, d)

    def lin(name, x):
        return (
            x @ theirs[f"local_cross_attention.{name}.weight"].t()
            + theirs[f"local_cross_attention.{name}.bias"]
        )

    i, t = patches[0], sentences[0]
    text_ctx = torch.sigmoid(lin("query2", t) @ lin("key1", i).t() / d**0.5) @ lin("value1", i)
    image_ctx = torch.sigmoid(lin("query1", i) @ lin("key2", t).t() / d**0.5) @ lin("value2", t)
    with torch.no_grad():
        ours = model.local_alignment(patches, sentences, torch.ones(1, 4, dtype=torch.bool))
    torch.testing.assert_close(ours.text_context[0], text_ctx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.image_context[0], image_ctx, rtol=1e-5, atol=1e-5)

    hf_cfg = BertConfig(
        vocab_size=cfg.text.vocab_size,
        hidden_size=d,
        num_hidden_layers=heads.decoder_layers,
        num_attention_heads=heads.decoder_heads,
        intermediate_size=heads.decoder_intermediate,
        max_position_embeddings=heads.decoder_max_positions,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        is_decoder=True,
        add_cross_attention=True,
    )
    decoder = BertModel(hf_cfg, add_pooling_layer=False).eval()
    prefix = "sentence_decoder."
    decoder.load_state_dict(
        {k.removeprefix(prefix): v for k, v in theirs.items() if k.startswith(prefix)},
        strict=False,
    )
    queries = theirs["prototype_queries"].expand(1, -1, -1)
    with torch.no_grad():
        expected = decoder(inputs_embeds=queries, encoder_hidden_states=patches).last_hidden_state
        got = model.sentence_decoder(patches)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("prefix", ["encoder.", "image_encoder.encoder."])
def test_the_authors_image_encoder_file_gives_a_backbone(prefix):
    """`prior_resnet50.pt`: their ResNet wrapper's state (torchvision's `encoder` and the
    attention pool), for `model.image.pretrained`."""
    with torch.device("meta"):
        backbone = resnet50()
        backbone.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
        backbone.fc = torch.nn.Identity()
    state = {prefix + k: v for k, v in backbone.state_dict().items()}
    state[prefix.replace("encoder.", "atten_pool.") + "positional_embedding"] = torch.zeros(50, 1)
    got = resnet_from_torchvision(state)
    assert set(got) == set(backbone.state_dict()) and got["conv1.weight"].shape[1] == 1


def test_pretraining_starts_from_the_authors_weights(tiny_shards, tmp_path):
    """`--set init_from=CKPT` on the tiny recipe in the reference layout: with the
    learning rate at 1e-30, the weights after one step are the file's (so they were loaded), and the
    log reports the strict load. The default layout (other keys) is refused by name."""
    from prior_dist.data.run_data import load_training_tokenizer
    from prior_dist.training.recipe import load_recipe
    from tests.pretrain_runs import ds_config, final_state, launch

    sets = [f"data.path={tiny_shards}", "model.compat_preset=reference"]
    recipe, _ = load_recipe("tiny", sets)
    tok = load_training_tokenizer(recipe.data, tiny_shards)
    torch.manual_seed(11)
    source = build_model(recipe.model.for_vocabulary(len(tok)))
    ckpt = tmp_path / "authors.ckpt"
    torch.save({"state_dict": prior_to_reference(source.state_dict())}, ckpt)
    # A step of size 1e-30 leaves every fp32 weight as it was.
    frozen = ["train.stages.0.lr=1.0e-30", "train.stages.0.warmup_start_lr=0.0"]
    options = ["model.compat_preset=reference", f"init_from={ckpt}", *frozen]
    run = tmp_path / "run"
    proc = launch(
        1, ds_config(tmp_path, 16), run, tiny_shards, "--max-steps", "1", overrides=options
    )
    assert f"init_from {ckpt} (the authors' checkpoint): all" in proc.stdout
    after = final_state(run, 1)
    for key, value in source.state_dict().items():
        if value.is_floating_point() and "running_" not in key:
            assert torch.equal(after[f"model.{key}"].float(), value.float()), key
    refused = launch(
        1,
        ds_config(tmp_path, 16),
        tmp_path / "refused",
        tiny_shards,
        "--max-steps",
        "1",
        overrides=[f"init_from={ckpt}"],
        check=False,
    )
    assert refused.returncode == 2 and "does not fit" in refused.stderr, refused.stderr[-2000:]
