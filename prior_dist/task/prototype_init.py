"""Data-dependent start for the sentence prototype bank (`heads.prototype_init: sentences`).

With the paper's W ~ N(0, 1), the demo's bank collapsed: after stage 2 four of 64 prototypes
took every sentence (softmax entropy 0.02), every zero-shot prompt mapped to the same prototype,
and the global loss went back towards chance. Starting W from real sentence embeddings, chosen
far apart from each other, is the usual remedy for codebook collapse in vector quantisation.
Every rank gathers the same sentences and picks the same rows, so the bank stays identical
across ranks; the training engine writes the value into every copy of the weight
(`prior_dist.training.engine.start_prototype_bank`: the ZeRO-3 partitions, the optimizer's
fp32 master copy).
"""

from __future__ import annotations

import torch


def farthest_point_rows(x_ND: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of `min(k, N)` rows of `x`: row 0, then each time the row farthest (Euclidean)
    from all rows chosen so far. Exact duplicates are never chosen twice while others remain."""
    x = x_ND.double()
    chosen = [0]
    distance = (x - x[0]).norm(dim=-1)
    for _ in range(1, min(k, len(x))):
        nxt = int(distance.argmax())
        if float(distance[nxt]) == 0.0:
            break
        chosen.append(nxt)
        distance = torch.minimum(distance, (x - x[nxt]).norm(dim=-1))
    return torch.tensor(chosen, dtype=torch.long)


def initial_prototypes(
    sentences_ND: torch.Tensor, num_prototypes: int, seed: int, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """`[K, D]`: the farthest-point sentences (`rows`, computed if not given); if there are
    fewer distinct ones than K, the rest are drawn from a normal with the sentences' mean and
    per-dimension spread."""
    if rows is None:
        rows = farthest_point_rows(sentences_ND, num_prototypes)
    picked = sentences_ND[rows].float()
    missing = num_prototypes - len(picked)
    if missing > 0:
        g = torch.Generator().manual_seed(seed)
        x = sentences_ND.float()
        spread = x.std(0) if len(x) > 1 else torch.ones(x.shape[1])
        extra = x.mean(0) + spread * torch.randn(missing, x.shape[1], generator=g)
        picked = torch.cat([picked, extra])
    return picked


@torch.no_grad()
def initial_bank(model, data: dict, seed: int, gather_rows) -> tuple[torch.Tensor, int]:
    """The bank's start `[K, D]` (fp32, on the host) from this global batch's sentences, and how
    many distinct ones it found. `gather_rows` concatenates every rank's `[N, D]` rows in rank
    order (the identity on one process), so every rank computes the same value."""
    was_training = model.training
    model.eval()
    text = model.encode_text(data["input_ids"], data["attention_mask"], data["sentence_index"])
    model.train(was_training)
    sentences = gather_rows(text.sentences[text.sentence_mask].float().cpu())
    num_prototypes = model.prototype_bank.prototypes.shape[0]
    rows = farthest_point_rows(sentences, num_prototypes)
    return initial_prototypes(sentences, num_prototypes, seed, rows), len(rows)
