"""Fixed batch shapes: token and sentence padding leave the losses and gradients as they were,
and the towers and heads compiled for those shapes compute what eager does, without graph
breaks or recompiles."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from prior_dist.data.transforms import TransformConfig, collate
from prior_dist.models import build_model
from prior_dist.models.config import model_config
from prior_dist.task import PriorTask, stage_plan
from prior_dist.task.noise import SampleNoise, noise_seeds
from prior_dist.training.engine import COMPILED_MODULES, compile_towers_and_heads
from tests.model_batch import ragged_batch


def padded(batch: dict, length: int, slots: int) -> dict:
    """`batch` with `length - L` more pad tokens and `slots` sentence slots."""
    extra = length - batch["input_ids"].shape[1]
    out = dict(batch, sentence_slots=slots)
    out["input_ids"] = F.pad(batch["input_ids"], (0, extra), value=0)
    out["attention_mask"] = F.pad(batch["attention_mask"], (0, extra), value=0)
    out["sentence_index"] = F.pad(batch["sentence_index"], (0, extra), value=-1)
    return out


def losses_and_grads(model, batch, stage):
    model.zero_grad()
    keys = [f"k{i}" for i in range(batch["image"].shape[0])]
    noise = SampleNoise(noise_seeds(keys, epoch=0, seed=3))
    out = PriorTask(model)(batch, stage_plan(stage), noise)
    out["total"].backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in out.items()}, grads


@pytest.mark.parametrize("stage", [1, 3])
def test_padding_to_buckets_leaves_losses_and_gradients_unchanged(stage):
    torch.manual_seed(0)
    model = build_model(model_config("tiny"))
    batch = ragged_batch(model.cfg, sentence_counts=(3, 1, 5, 2), extra_pad=0)
    tight, tight_grads = losses_and_grads(model, dict(batch, sentence_slots=5), stage)
    loose, loose_grads = losses_and_grads(
        model, padded(batch, batch["input_ids"].shape[1] + 13, slots=16), stage
    )
    assert tight.keys() == loose.keys()
    for name in tight:
        torch.testing.assert_close(loose[name], tight[name], rtol=1e-5, atol=1e-6, msg=name)
    assert tight_grads.keys() == loose_grads.keys()
    # fp32 summation order differs with the shapes: gradients agree to 1e-6 of the largest.
    floor = 1e-6 * max(float(g.abs().max()) for g in tight_grads.values())
    for name, grad in tight_grads.items():
        torch.testing.assert_close(loose_grads[name], grad, rtol=1e-4, atol=floor, msg=name)


def _sample(n_tokens: int, n_sentences: int) -> dict:
    index = [-1] + [i * n_sentences // (n_tokens - 2) for i in range(n_tokens - 2)] + [-1]
    return {
        "key": f"s{n_tokens}",
        "image": torch.zeros(1, 8, 8),
        "input_ids": list(range(n_tokens)),
        "sentence_index": index,
        "sentences": [],
        "flipped": False,
    }


def test_collate_pads_to_buckets_within_max_tokens():
    cfg = TransformConfig(image_size=8, max_tokens=100, token_bucket=32, sentence_bucket=8)
    batch = collate([_sample(40, 3), _sample(20, 9)], 0, 8, cfg=cfg)
    assert batch["input_ids"].shape == (2, 64) and batch["sentence_slots"] == 16
    assert batch["attention_mask"].sum().item() == 60
    assert (batch["sentence_index"][:, 40:] == -1).all()
    longest = collate([_sample(99, 2)], 0, 8, cfg=cfg)  # 128 would pass max_tokens
    assert longest["input_ids"].shape == (1, 100) and longest["sentence_slots"] == 8
    own = collate([_sample(40, 3), _sample(20, 9)], 0, 8)  # no buckets: the batch's own
    assert own["input_ids"].shape == (2, 40) and own["sentence_slots"] == 9


def bucketed(batch: dict, bucket: int = 32, slots: int = 16) -> dict:
    """`batch` padded as the loader pads it: tokens to a multiple of `bucket`, `slots` slots."""
    return padded(batch, -(-batch["input_ids"].shape[1] // bucket) * bucket, slots)


@pytest.mark.timeout(1500)
def test_compiled_towers_and_heads_equal_eager_without_breaks_or_recompiles():
    """What `train.compile` does, on the CPU (inductor), at stage 3 (every head runs): the same
    losses and gradients as eager, no graph break, and once each token bucket has been seen,
    no recompile whatever the reports' lengths and sentence counts (within the bucket)."""
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    eager = build_model(model_config("tiny"))
    compiled = copy.deepcopy(eager)
    assert compile_towers_and_heads(compiled, torch.device("cpu")) == list(COMPILED_MODULES)
    g = torch.Generator().manual_seed(5)
    # One token bucket (32: at most 6 sentences of 4 tokens), compiled once; then reports of
    # other lengths and sentence counts in it. (A new bucket compiles once more, by design.)
    warmup = [((3, 1, 5, 2), (1, 4))]
    varied = [
        (tuple(torch.randint(1, 7, (4,), generator=g).tolist()), (1, int(torch.randint(1, 5, ()))))
        for _ in range(2)
    ]
    for i, (counts, tokens) in enumerate(warmup + varied):
        raw = ragged_batch(eager.cfg, counts, tokens, seed=i, extra_pad=0)
        batch = bucketed(raw)
        with torch._dynamo.config.patch(error_on_recompile=i >= len(warmup)):
            got, got_grads = losses_and_grads(compiled, batch, stage=3)
        want, want_grads = losses_and_grads(eager, batch, stage=3)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)
        floor = 1e-5 * max(float(v.abs().max()) for v in want_grads.values())
        for name, grad in want_grads.items():
            torch.testing.assert_close(got_grads[name], grad, rtol=1e-3, atol=floor, msg=name)
    assert not counters["graph_break"], [r.splitlines()[:2] for r in counters["graph_break"]]
