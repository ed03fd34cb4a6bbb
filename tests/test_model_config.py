"""Configs, shapes, the curriculum, parameter accounting, gradients per stage, import rules."""

import ast
import re
from pathlib import Path

import pytest
import torch

from prior_dist.models import ModelConfig, build_model, model_config
from prior_dist.models.config import HeadsConfig, ImageTowerConfig, TextTowerConfig
from prior_dist.ops.local_attention import local_attention
from prior_dist.task import PriorTask, stage_plan
from tests.conftest import REPO, run_cli
from tests.model_batch import ragged_batch


@pytest.mark.parametrize("name", ["tiny", "demo", "paper"])
def test_shapes_for_every_config(name):
    torch.manual_seed(0)
    cfg = model_config(name)
    model = build_model(cfg).eval()
    batch = ragged_batch(cfg, sentence_counts=(2, 5), extra_pad=1)
    d, (h, w) = cfg.heads.embed_dim, cfg.image.grid
    with torch.no_grad():
        img = model.encode_image(batch["image"])
        txt = model.encode_text(
            batch["input_ids"], batch["attention_mask"], batch["sentence_index"]
        )
        assert img.global_embedding.shape == (2, d)
        assert img.patch_tokens.shape == (2, h * w, d) and img.grid == (h, w)
        assert txt.token_embeddings.shape == (2, batch["input_ids"].shape[1], d)
        assert txt.sentences.shape == (2, 5, d) and txt.sentence_mask.sum(1).tolist() == [2, 5]
        local = model.local_alignment(img.patch_tokens, txt.sentences, txt.sentence_mask)
        assert local.text_context.shape == (2, 5, d) and local.image_context.shape == (2, h * w, d)
        recon = model.reconstruct_image(img.patch_tokens, local.image_context, img.grid)
        assert recon.shape == batch["image"].shape
        generated = model.sentence_decoder(img.patch_tokens)
        assert generated.shape == (2, cfg.heads.num_queries, d)


@pytest.mark.parametrize(
    "bad, field",
    [
        # Built in code: pydantic's error names the class and the field.
        (lambda: ImageTowerConfig(arch="densenet"), "ImageTowerConfig\narch"),
        (lambda: ImageTowerConfig(image_size=100), "image.image_size"),
        (lambda: TextTowerConfig(hidden_size=100, num_heads=12), "text.hidden_size"),
        (lambda: TextTowerConfig(dropout=1.5), "TextTowerConfig\ndropout"),
        (lambda: HeadsConfig(local_attention_impl="cuda"), "HeadsConfig\nlocal_attention_impl"),
        (lambda: HeadsConfig(image_decoder_widths=(8, 8)), "HeadsConfig\nimage_decoder_widths"),
        (
            lambda: model_config("tiny").compat.__class__(matching="greedy"),
            "CompatConfig\nmatching",
        ),
        # From a mapping (a recipe, a run directory): the dotted path.
        (
            lambda: ModelConfig.from_dict({"heads": {"embed_dims": 3}}),
            "model.heads.embed_dims: unknown field",
        ),
        (lambda: ModelConfig.from_dict({"optim": {}}), "model.optim: unknown field"),
        (
            lambda: ModelConfig.from_dict({"text": {"dropout": 1.5}}),
            "model.text.dropout: input should be less than 1, got 1.5",
        ),
        (
            lambda: ModelConfig.from_dict({"image": {"layers": [1, 1, "1", 1]}}),
            "model.image.layers.2: input should be a valid integer, got '1'",
        ),
        (
            lambda: ModelConfig.from_dict({"image": {"image_size": 100}}),
            "multiple of 32 for a ResNet tower (its stride), got 100 (in model.image)",
        ),
        (lambda: model_config("huge"), "model"),
    ],
)
def test_bad_config_values_name_the_field(bad, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        bad()


def test_config_round_trips_through_a_dict():
    cfg = model_config("demo", "reference")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_curriculum_plans():
    one, two, three = (stage_plan(s) for s in (1, 2, 3))
    assert dict(one.weights) == {"global": 1, "local_image": 1, "local_text": 1}
    assert not one.use_prototypes and one.max_sentences is None and not one.reconstruction
    assert dict(two.weights) == {"global": 1, "local_image": 1, "local_text": 1, "proto": 10}
    assert two.use_prototypes and two.max_sentences is None
    assert dict(three.weights) == {
        "global": 10,
        "local_image": 1,
        "local_text": 1,
        "rec_image": 1,
        "spg": 10,
        "kl": 1,
        "gpa": 1,
        "proto": 10,
    }
    assert three.use_prototypes and three.max_sentences == 16 and three.reconstruction
    assert stage_plan(3, weights={3: {"global": 1, "kl": 0}}).weights == {"global": 1}
    with pytest.raises(ValueError, match="stage must be"):
        stage_plan(4)
    with pytest.raises(ValueError, match="unknown loss"):
        stage_plan(1, weights={1: {"globl": 1}})


def test_info_paper_reference_layout_has_the_papers_parameter_count(capsys):
    from prior_dist.info import main as info

    assert info(["--model", "paper", "--compat", "reference", "--no-flops"]) == 0
    out = capsys.readouterr().out
    rows = {}
    for line in out.splitlines():
        m = re.match(r"(.+?)\s+([\d.]+)M\s+([\d.]+)M", line)
        if m:
            rows[m.group(1).strip()] = float(m.group(2)) + float(m.group(3))
    expected = {
        "image backbone": 23.50,
        "image attention pool": 16.89,
        "text BERT": 108.31,
        "sentence decoder": 98.29,
        "image decoder": 21.22,
    }
    for name, value in expected.items():
        assert rows[name] == pytest.approx(value, abs=0.006), name
    assert rows["total"] == pytest.approx(279.43, abs=0.006)
    assert info(["--model", "paper", "--no-flops"]) == 0
    lean = capsys.readouterr().out
    assert "frozen" in lean and re.search(r"^total\s+255\.98M\s+0\.00M", lean, re.M)


def test_info_reports_flops_for_demo():
    out = run_cli("prior_dist.info", "--model", "demo").stdout
    flops = dict(re.findall(r"^\s+(image tower|text tower|heads|total)\s+([\d.]+)$", out, re.M))
    assert set(flops) == {"image tower", "text tower", "heads", "total"}
    assert all(float(v) > 0 for v in flops.values())
    assert run_cli("prior_dist.info", "--model", "nope", check=False).returncode == 2


UNUSED_BY_STAGE = {
    1: ("prototype_bank.", "image_decoder.", "sentence_decoder."),
    2: ("image_decoder.", "sentence_decoder."),
    3: (),
}


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("compat", ["default", "reference"])
def test_every_parameter_a_stage_uses_gets_a_gradient(stage, compat):
    torch.manual_seed(0)
    model = build_model(model_config("tiny", compat)).train()
    batch = ragged_batch(model.cfg, sentence_counts=(3, 1, 6, 2))
    out = PriorTask(model)(batch, stage_plan(stage))
    out["total"].backward()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert compat == "reference" and param.grad is None
            assert name.startswith(
                ("text.bert.pooler", "text.global_proj", "sentence_decoder.word_embeddings")
            ), name
            continue
        unused = name.startswith(UNUSED_BY_STAGE[stage])
        if unused:
            assert param.grad is None, f"{name} got a gradient in stage {stage}"
        else:
            assert param.grad is not None, f"{name} got no gradient in stage {stage}"
            assert torch.isfinite(param.grad).all(), name
            if name != "text.bert.word_embeddings.weight":  # rows of unused tokens stay zero
                assert param.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def test_same_seed_same_result():
    def run():
        torch.manual_seed(11)
        model = build_model(model_config("tiny"))
        batch = ragged_batch(model.cfg)
        out = PriorTask(model)(batch, stage_plan(3))
        out["total"].backward()
        return out["total"].detach(), model.text.token_proj.weight.grad.clone()

    (a, ga), (b, gb) = run(), run()
    assert torch.equal(a, b) and torch.equal(ga, gb)


def test_prototype_bank_is_deterministic_at_evaluation_unless_eval_gumbel():
    torch.manual_seed(0)
    for eval_gumbel in (False, True):
        compat = model_config("tiny").compat.__class__(eval_gumbel=eval_gumbel)
        bank = build_model(model_config("tiny", compat)).prototype_bank.eval()
        x = torch.randn(3, 4, bank.prototypes.shape[1])
        same = torch.equal(bank(x), bank(x))
        assert same is (not eval_gumbel)
    bank.train()
    noise = torch.rand(3, 4, bank.prototypes.shape[0])
    assert torch.equal(bank(x, noise), bank(x, noise))  # tied noise reproduces


def test_explicit_triton_local_attention_that_cannot_run_raises(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("on CUDA the kernel can run")
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # CPU tensors, no interpreter: no Triton
    q = torch.randn(1, 2, 4)
    with pytest.raises(RuntimeError, match="local_attention_impl='triton' cannot run"):
        local_attention(q, q, q, scale=1.0, impl="triton")
    assert local_attention(q, q, q, scale=1.0, impl="auto").shape == q.shape


MODEL_PACKAGES = ("prior_dist/models", "prior_dist/losses", "prior_dist/ops")


def distributed_imports(path: Path) -> list[str]:
    """Lines of `path` that import torch.distributed or deepspeed (any import form)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            names = [module] + [f"{module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Call) and getattr(
            node.func, "attr", getattr(node.func, "id", "")
        ) in ("import_module", "__import__"):
            names = [a.value for a in node.args if isinstance(a, ast.Constant)]
        if any(str(n).startswith(("torch.distributed", "deepspeed")) for n in names):
            found.append(f"{path}:{node.lineno}")
    return found


def test_model_files_do_not_import_torch_distributed(tmp_path):
    files = [p for package in MODEL_PACKAGES for p in sorted(Path(REPO, package).rglob("*.py"))]
    assert len(files) > 10
    offenders = [hit for path in files for hit in distributed_imports(path)]
    assert not offenders, offenders
    planted = tmp_path / "planted.py"
    for line in (
        "import torch.distributed as dist",
        "from torch import distributed",
        "from torch.distributed import all_gather",
        "importlib.import_module('torch.distributed')",
    ):
        planted.write_text(line + "\n")
        assert distributed_imports(planted), line


def test_reference_preset_sets_the_head_switches_and_a_recipe_can_override_them():
    from prior_dist.training.recipe import load_recipe

    default, reference = model_config("paper"), model_config("paper", "reference")
    assert (default.heads.sentence_loss_mean, reference.heads.sentence_loss_mean) == (
        "per_report",
        "pooled",
    )
    assert default.heads.detach_generation_targets and not reference.heads.detach_generation_targets
    assert default.heads.image_decoder_conv_bias and not reference.heads.image_decoder_conv_bias
    recipe, _ = load_recipe(
        "tiny", ["model.compat_preset=reference", "model.heads.detach_generation_targets=true"]
    )
    assert recipe.model.heads.detach_generation_targets  # the user's word wins
    assert recipe.model.heads.sentence_loss_mean == "pooled"
    assert recipe.model.compat.token_layout == "reference_view"


def test_reference_layout_has_the_authors_exact_parameter_count():
    """279,429,427: the authors' model, whose image decoder convs before BatchNorm carry no
    bias (our default keeps them: 2 x (768 + 384 + 192 + 96 + 48) = 2,976 more)."""
    with torch.device("meta"):
        reference = build_model(model_config("paper", "reference"))
        biased = build_model(
            model_config("paper", "reference").replace(
                heads=HeadsConfig(
                    **{
                        **model_config("paper", "reference").heads.__dict__,
                        "image_decoder_conv_bias": True,
                    }
                )
            )
        )
    assert sum(p.numel() for p in reference.parameters()) == 279_429_427
    assert sum(p.numel() for p in biased.parameters()) == 279_429_427 + 2_976

    def conv_biases(model):
        pattern = r"image_decoder\.blocks\.\d\.[14]\.bias"  # the convs BatchNorm follows
        return [n for n, _ in model.named_parameters() if re.fullmatch(pattern, n)]

    assert conv_biases(reference) == [] and len(conv_biases(biased)) == 10


def test_info_describes_what_a_recipe_trains():
    """`info --model demo` is the named model (16-wide image tower); the demo recipe trains a
    32-wide one with a 4096-word vocabulary: `info --recipe demo` counts that one."""
    from prior_dist.training.recipe import load_recipe

    out = run_cli("prior_dist.info", "--recipe", "demo", "--no-flops").stdout
    recipe, _ = load_recipe("demo")
    with torch.device("meta"):
        model = build_model(recipe.model.for_vocabulary(4096))
    expected = sum(p.numel() for p in model.parameters()) / 1e6
    total = float(re.search(r"^total\s+([\d.]+)M\s+([\d.]+)M", out, re.M).group(1))
    assert total == pytest.approx(expected, abs=0.006) and "recipe demo" in out
    named = run_cli("prior_dist.info", "--model", "demo", "--no-flops").stdout
    assert float(re.search(r"^total\s+([\d.]+)M", named, re.M).group(1)) < total
