"""PRIOR's heads and losses against slow per-sample implementations, plus gradient checks."""

import itertools

import pytest
import torch

from prior_dist.losses import (
    global_contrastive_loss,
    intra_report_contrastive_loss,
)
from prior_dist.models import build_model, model_config
from prior_dist.models.matching import align_to_targets, hungarian_assignment
from prior_dist.models.pooling import AttentionPool, sentence_means
from prior_dist.ops.local_attention import local_attention, local_attention_reference
from prior_dist.task import PriorTask, stage_plan
from prior_dist.testing import per_sample
from tests.model_batch import ragged_batch


def _tiny(seed=0, heads=None, **compat):
    torch.manual_seed(seed)
    cfg = model_config("tiny")
    if compat:
        cfg = cfg.replace(compat=cfg.compat.__class__(**compat))
    changes = {**cfg.heads.__dict__, "feature_dropout": 0.0, **(heads or {})}
    return build_model(cfg.replace(heads=cfg.heads.__class__(**changes)))


def test_sentence_means_and_report_pool_equal_per_sample():
    torch.manual_seed(1)
    tokens = torch.randn(4, 12, 8)
    index = torch.full((4, 12), -1)
    index[0, 1:7] = torch.tensor([0, 0, 1, 1, 1, 2])
    index[1, 1:3] = torch.tensor([0, 0])  # one sentence
    index[2, 1:10] = torch.tensor([0, 1, 2, 3, 4, 5, 6, 6, 7])
    index[3, 1:6] = torch.tensor([0, 2, 2, 3, 3])  # sentence 1 lost all its tokens
    sentences, mask = sentence_means(tokens, index)
    pool = AttentionPool(8, 2)
    pooled = pool(sentences, mask)
    for b in range(4):
        expected = per_sample.sentence_means(tokens[b], index[b])
        n = expected.shape[0]
        assert mask[b].sum() == n and mask[b, :n].all()
        torch.testing.assert_close(sentences[b, :n], expected)
        assert (sentences[b, n:] == 0).all()
        torch.testing.assert_close(
            pooled[b], per_sample.attention_pool(pool, expected), rtol=1e-5, atol=1e-6
        )
    capped, capped_mask = sentence_means(tokens, index, max_sentences=2)
    assert capped.shape[1] == 2 and capped_mask.sum(1).tolist() == [2, 1, 2, 2]
    torch.testing.assert_close(capped[3], per_sample.sentence_means(tokens[3], index[3], 2))


def test_report_pool_ignores_padding_values():
    torch.manual_seed(2)
    pool = AttentionPool(8, 2)
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    poisoned = x.clone()
    poisoned[0, 2:] = 1e4
    torch.testing.assert_close(pool(x, mask), pool(poisoned, mask))


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize(
    "matching, mean",
    [("correct", "per_report"), ("reference", "per_report"), ("correct", "pooled")],
)
def test_task_equals_per_sample_heads(stage, matching, mean):
    """Ragged reports (3, 1, 12, 2 sentences): L_proto and L_kl per report or pooled over the
    batch's sentences, against one-sample-at-a-time formulas."""
    model = _tiny(matching=matching, heads={"sentence_loss_mean": mean})
    batch = ragged_batch(model.cfg, sentence_counts=(3, 1, 12, 2))
    plan = stage_plan(stage, sentence_cap=4)
    task = PriorTask(model)
    img = model.encode_image(batch["image"])
    txt = model.encode_text(
        batch["input_ids"], batch["attention_mask"], batch["sentence_index"], plan.max_sentences
    )
    q, k = model.cfg.heads.num_queries, model.cfg.heads.num_prototypes
    g = torch.Generator().manual_seed(5)
    noise = {
        "sentences": torch.rand(4, 12, k, generator=g),
        "generated": torch.rand(4, q, k, generator=g),
    }
    generated = model.sentence_decoder(img.patch_tokens) if stage == 3 else None
    ours = task.head_losses(
        img, txt.sentences, txt.sentence_mask, batch["image"], plan, noise, generated=generated
    )

    def slow(pooled: bool) -> dict:
        return per_sample.heads_losses(
            model,
            img.patch_tokens,
            img.global_embedding,
            txt.token_embeddings,
            batch["sentence_index"],
            generated=generated,
            use_prototypes=plan.use_prototypes,
            sentence_cap=plan.max_sentences,
            noise_sentences=noise["sentences"],
            noise_generated=noise["generated"],
            pooled=pooled,
        )

    theirs = slow(mean == "pooled")
    assert set(ours) - {"total", "rec_image"} == set(theirs) - ({"proto"} if stage == 1 else set())
    for name, value in theirs.items():
        torch.testing.assert_close(ours[name], value, rtol=1e-4, atol=1e-5, msg=name)
    if mean == "pooled" and stage > 1:
        # The two means differ on ragged reports: the switch is not a no-op.
        other = slow(False)
        gap = float((other["proto"] - ours["proto"]).detach().abs())
        assert gap > 1e-4 * float(ours["proto"].detach())


def test_one_sentence_report_gives_zero_intra_report_loss():
    ctx, sent = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    mask = torch.tensor([[1, 0, 0], [1, 0, 0]], dtype=torch.bool)
    assert intra_report_contrastive_loss(ctx, sent, mask, torch.tensor(100.0)) == 0


def test_local_attention_padded_sentences_contribute_nothing():
    torch.manual_seed(3)
    q, k, v = torch.randn(2, 5, 8), torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    key_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    out, att = local_attention(q, k, v, None, key_mask, scale=0.3, return_attention=True)
    poisoned_v = v.clone()
    poisoned_v[0, 2:] = 1e6
    torch.testing.assert_close(out, local_attention(q, k, poisoned_v, None, key_mask, scale=0.3))
    assert (att[0, :, 2:] == 0).all()
    query_mask = torch.tensor([[1, 1, 1, 0, 0], [1] * 5], dtype=torch.bool)
    assert (local_attention(q, k, v, query_mask, key_mask, scale=0.3)[0, 3:] == 0).all()
    soft = local_attention_reference(q, k, v, None, key_mask, 0.3, "softmax")
    rows = torch.softmax((q[0] @ k[0, :2].t()) * 0.3, dim=-1) @ v[0, :2]
    torch.testing.assert_close(soft[0], rows)


def test_global_loss_over_simulated_ranks_equals_full_batch():
    torch.manual_seed(4)
    world, per_rank, dim = 3, 4, 6
    weight = torch.randn(dim, dim, dtype=torch.float64, requires_grad=True)
    x_img = torch.randn(world * per_rank, dim, dtype=torch.float64)
    x_txt = torch.randn(world * per_rank, dim, dtype=torch.float64)
    scale = torch.tensor(10.0, dtype=torch.float64)

    def features():
        return x_img @ weight, torch.tanh(x_txt @ weight)

    image, text = features()
    full = per_sample.global_infonce(image, text, scale)
    (full_grad,) = torch.autograd.grad(full, weight)

    class SimulatedGather:
        """Rank r's all_gather with gradient: its own rows in its slot, the other ranks' rows
        (normalised as they would normalise them) elsewhere; calls come image first, then text."""

        def __init__(self, rank, tensors):
            self.rank, self.world_size, self.tensors, self.calls = rank, world, tensors, 0

        def __call__(self, x):
            full = torch.nn.functional.normalize(self.tensors[self.calls % 2], dim=-1)
            self.calls += 1
            lo, hi = self.rank * per_rank, (self.rank + 1) * per_rank
            return torch.cat([full[:lo], x, full[hi:]])

    image, text = features()
    per_rank_losses = []
    for rank in range(world):
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        gather = SimulatedGather(rank, [image, text])
        per_rank_losses.append(global_contrastive_loss(image[rows], text[rows], scale, gather))
    # DDP averages gradients over ranks: the mean of the per-rank losses is what is optimised.
    mean = torch.stack(per_rank_losses).mean()
    (grad,) = torch.autograd.grad(mean, weight)
    torch.testing.assert_close(mean, full, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, full_grad, rtol=1e-8, atol=1e-10)
    # The labels follow the global rank: scoring rank 1's rows as if they were rank 0's differs.
    wrong = SimulatedGather(1, [image, text])
    wrong.rank = 0
    offset = global_contrastive_loss(
        image[per_rank : 2 * per_rank], text[per_rank : 2 * per_rank], scale, wrong
    )
    assert not torch.isclose(offset, per_rank_losses[1])


def test_hungarian_batched_equals_brute_force():
    torch.manual_seed(6)
    cost = torch.rand(5, 4, 4)
    assignment = hungarian_assignment(cost)
    for b in range(5):
        best = min(
            itertools.permutations(range(4)), key=lambda p: sum(cost[b, i, p[i]] for i in range(4))
        )
        assert assignment[b].tolist() == list(best)


def test_align_to_targets_correct_pairs_and_reference_quirk_does_not():
    outputs = torch.arange(4.0)[None, :, None].expand(1, 4, 2).clone()  # row i holds value i
    assignment = torch.tensor([[2, 0, 3, 1]])  # output i -> target assignment[i]
    correct = align_to_targets(outputs, assignment, "correct")
    # Target j must receive the output matched to it.
    for i, j in enumerate(assignment[0].tolist()):
        assert correct[0, j, 0] == i
    reference = align_to_targets(outputs, assignment, "reference")
    assert reference[0, :, 0].tolist() == [2, 0, 3, 1]
    assert not torch.equal(correct, reference)


def _gradcheck(fn, *inputs):
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5)


def test_gradients_of_losses_and_attention_double():
    torch.manual_seed(7)
    d = lambda *s: torch.randn(*s, dtype=torch.float64, requires_grad=True)  # noqa: E731
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    _gradcheck(
        lambda q, k, v: local_attention(q, k, v, mask, mask, scale=0.5),
        d(2, 3, 4),
        d(2, 3, 4),
        d(2, 3, 4),
    )
    _gradcheck(
        lambda q, k, v: local_attention_reference(q, k, v, None, mask, 0.5, "softmax"),
        d(2, 3, 4),
        d(2, 3, 4),
        d(2, 3, 4),
    )
    _gradcheck(
        lambda c, s: intra_report_contrastive_loss(c, s, mask, torch.tensor(3.0)),
        d(2, 3, 4),
        d(2, 3, 4),
    )
    _gradcheck(lambda a, b: global_contrastive_loss(a, b, torch.tensor(3.0)), d(4, 5), d(4, 5))
    index = torch.tensor([[-1, 0, 0, 1, -1], [-1, 0, 1, 1, 2]])
    _gradcheck(lambda t: sentence_means(t, index)[0], d(2, 5, 3))
