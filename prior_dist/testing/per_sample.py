"""Slow, obvious, per-sample implementations of PRIOR's heads, written from the spec.

They use a `PriorModel`'s weights but none of its batched code: one report at a time, plain
matrix products, Python loops, a host transfer per sample for the matching. Tests check the
batched code against them; `bench/heads.py` times the batched code against them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment


def sentence_means(
    tokens_LD: torch.Tensor, sentence_index_L: torch.Tensor, max_sentences: int | None = None
) -> torch.Tensor:
    """`[S, D]` for one report: the mean of each non-empty sentence's tokens, in index order."""
    rows = []
    for s in sorted(set(sentence_index_L.tolist()) - {-1}):
        rows.append(tokens_LD[sentence_index_L == s].mean(dim=0))
    rows = rows[:max_sentences] if max_sentences is not None else rows
    return torch.stack(rows) if rows else tokens_LD.new_zeros(0, tokens_LD.shape[-1])


def attention_pool(pool, tokens_ND: torch.Tensor) -> torch.Tensor:
    """CLIP-style attention pool of one token set `[N, C]` -> `[C]` (all queries computed)."""
    x = torch.cat([tokens_ND.mean(0, keepdim=True), tokens_ND])
    if pool.positional_embedding is not None:
        x = x + pool.positional_embedding
    heads = pool.num_heads
    q, k, v = pool.q_proj(x), pool.k_proj(x), pool.v_proj(x)
    dh = q.shape[-1] // heads
    outputs = []
    for h in range(heads):
        part = slice(h * dh, (h + 1) * dh)
        weights = torch.softmax(q[:, part] @ k[:, part].t() / math.sqrt(dh), dim=-1)
        outputs.append(weights @ v[:, part])
    return pool.c_proj(torch.cat(outputs, dim=-1))[0]


def local_alignment(module, patches_PD: torch.Tensor, sentences_SD: torch.Tensor):
    """(C_t [S, D], C_i [P, D]) for one sample, with sigmoid attention."""
    scale = 1.0 / math.sqrt(patches_PD.shape[-1])
    a_ti = torch.sigmoid(module.text_query(sentences_SD) @ module.image_key(patches_PD).t() * scale)
    a_it = torch.sigmoid(module.image_query(patches_PD) @ module.text_key(sentences_SD).t() * scale)
    return a_ti @ module.image_value(patches_PD), a_it @ module.text_value(sentences_SD)


def simsiam(predictor, patches_PD: torch.Tensor, context_PD: torch.Tensor) -> torch.Tensor:
    a = F.cosine_similarity(predictor(patches_PD), context_PD.detach(), dim=-1).mean()
    b = F.cosine_similarity(predictor(context_PD), patches_PD.detach(), dim=-1).mean()
    return -(a + b) / 2


def intra_report(
    context_SD: torch.Tensor, sentences_SD: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    logits = scale * F.normalize(context_SD, dim=-1) @ F.normalize(sentences_SD, dim=-1).t()
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def global_infonce(
    image_ND: torch.Tensor, text_ND: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    logits = scale * F.normalize(image_ND, dim=-1) @ F.normalize(text_ND, dim=-1).t()
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def prototypes(bank, sentences_SD: torch.Tensor, uniform_SK: torch.Tensor | None) -> torch.Tensor:
    logits = sentences_SD @ bank.prototypes.t()
    if uniform_SK is not None:
        logits = logits - torch.log(-torch.log(uniform_SK))
    return torch.softmax(logits / bank.tau, dim=-1) @ bank.prototypes


def match(generated_QD: torch.Tensor, targets_QD: torch.Tensor, mode: str) -> torch.Tensor:
    """Generated rows reordered to pair with targets; one host transfer for this sample."""
    cost = torch.cdist(generated_QD.detach(), targets_QD.detach(), p=1).cpu().numpy()
    rows, cols = linear_sum_assignment(cost)
    order = [0] * len(cols)
    for output, target in zip(rows, cols):
        order[target] = output
    index = torch.as_tensor(order if mode == "correct" else cols, device=generated_QD.device)
    return generated_QD[index]


def heads_losses(
    model,
    patches,
    image_global,
    tokens,
    sentence_index,
    generated=None,
    use_prototypes=False,
    sentence_cap=None,
    noise_sentences=None,
    noise_generated=None,
    pooled=False,
) -> dict[str, torch.Tensor]:
    """Every loss after the encoders, one sample at a time (decoder outputs are inputs here).
    `pooled`: L_proto and L_kl are one mean over every sentence of the batch instead of each
    report's mean, then the mean over reports."""
    batch = patches.shape[0]
    bank, pool = model.prototype_bank, model.report_pool
    out = {k: [] for k in ("proto", "local_image", "local_text", "spg", "kl")}
    reports, generated_reports = [], []
    for b in range(batch):
        sentences = sentence_means(tokens[b], sentence_index[b], sentence_cap)
        n = sentences.shape[0]
        aligned = sentences
        if use_prototypes:
            noise = None if noise_sentences is None else noise_sentences[b, :n]
            aligned = prototypes(bank, sentences, noise)
            out["proto"].append((sentences - aligned).abs().mean(-1))
        reports.append(attention_pool(pool, aligned))
        c_t, c_i = local_alignment(model.local_alignment, patches[b], aligned)
        out["local_image"].append(simsiam(model.predictor, patches[b], c_i))
        out["local_text"].append(intra_report(c_t, aligned, model.local_scale))
        if generated is not None:
            q = generated.shape[1]
            k = min(n, q)
            targets = torch.cat([aligned[:k], aligned.new_zeros(q - k, aligned.shape[1])])
            matched = match(generated[b], targets, model.cfg.compat.matching)
            out["spg"].append((matched - targets).abs().mean())
            p = F.log_softmax(sentences[:k] @ bank.prototypes.t(), dim=-1)
            r = F.log_softmax(matched[:k] @ bank.prototypes.t(), dim=-1)
            out["kl"].append((p.exp() * (p - r)).sum(-1))
            noise = None if noise_generated is None else noise_generated[b, :k]
            generated_reports.append(attention_pool(pool, prototypes(bank, matched[:k], noise)))
    per_sentence = {"proto", "kl"}  # one value per sentence, not per report
    losses = {
        k: torch.cat(v).mean()
        if k in per_sentence and pooled
        else torch.stack([x.mean() for x in v] if k in per_sentence else v).mean()
        for k, v in out.items()
        if v
    }
    report = torch.stack(reports)
    losses["global"] = global_infonce(image_global, report, model.global_scale)
    if generated is not None:
        losses["gpa"] = global_infonce(torch.stack(generated_reports), report, model.global_scale)
    return losses
