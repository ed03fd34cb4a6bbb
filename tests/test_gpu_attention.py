"""GPU-only parity: flash-attn (padding-free BERT, ViT) against SDPA on the same weights."""

import pytest
import torch

from prior_dist.models.attention import flash_attn_module
from prior_dist.models.bert import BertEncoder
from prior_dist.models.config import ImageTowerConfig, TextTowerConfig
from prior_dist.models.vit import ViTTower

pytestmark = pytest.mark.gpu

needs_flash = pytest.mark.skipif(
    not torch.cuda.is_available() or flash_attn_module() is None,
    reason="needs a CUDA device and the flash-attn package (optional GPU path)",
)


def _relative_error(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@needs_flash
def test_bert_flash_varlen_matches_sdpa_in_bf16():
    torch.manual_seed(0)
    cfg = TextTowerConfig(
        vocab_size=500,
        hidden_size=128,
        num_layers=2,
        num_heads=4,
        intermediate_size=256,
        dropout=0.0,
    )
    flash = BertEncoder(TextTowerConfig(**{**cfg.__dict__, "attention_impl": "flash"}))
    sdpa = BertEncoder(TextTowerConfig(**{**cfg.__dict__, "attention_impl": "sdpa"}))
    sdpa.load_state_dict(flash.state_dict())
    flash, sdpa = (m.cuda().to(torch.bfloat16).eval() for m in (flash, sdpa))
    ids = torch.randint(1, 500, (4, 33), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    mask[3, 5:] = 0
    with torch.no_grad():
        a, b = flash(ids, mask), sdpa(ids, mask)
    real = mask.bool()
    assert _relative_error(a[real], b[real]) < 2e-2
    assert (a[~real] == 0).all()  # padding-free path writes nothing for pad tokens


@needs_flash
def test_vit_flash_matches_sdpa_in_bf16():
    torch.manual_seed(0)
    cfg = ImageTowerConfig(
        arch="vit", image_size=64, patch_size=16, vit_depth=2, vit_width=64, vit_heads=4
    )
    flash = ViTTower(ImageTowerConfig(**{**cfg.__dict__, "attention_impl": "flash"}), 32)
    sdpa = ViTTower(ImageTowerConfig(**{**cfg.__dict__, "attention_impl": "sdpa"}), 32)
    sdpa.load_state_dict(flash.state_dict())
    flash, sdpa = (m.cuda().to(torch.bfloat16).eval() for m in (flash, sdpa))
    x = torch.randn(2, 1, 64, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        assert _relative_error(flash(x).patch_tokens, sdpa(x).patch_tokens) < 2e-2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tiny_prior_step_runs_on_cuda():
    from prior_dist.models import build_model, model_config
    from prior_dist.task import PriorTask, stage_plan
    from tests.model_batch import ragged_batch

    model = build_model(model_config("tiny")).cuda()
    batch = {k: v.cuda() for k, v in ragged_batch(model.cfg).items()}
    out = PriorTask(model)(batch, stage_plan(3))
    out["total"].backward()
    assert torch.isfinite(out["total"])
