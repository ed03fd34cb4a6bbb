"""Synthetic batches for model tests: ragged reports, one-sentence reports, padding."""

from __future__ import annotations

import torch


def ragged_batch(
    cfg, sentence_counts=(3, 1, 5, 2), tokens_per_sentence=(1, 4), seed=0, extra_pad=3
) -> dict:
    """A collate-shaped batch: [CLS] sentences [SEP] then pad, sentence_index -1 on specials."""
    g = torch.Generator().manual_seed(seed)
    rows_ids, rows_index = [], []
    for count in sentence_counts:
        ids, index = [2], [-1]
        for s in range(count):
            n = int(
                torch.randint(tokens_per_sentence[0], tokens_per_sentence[1] + 1, (1,), generator=g)
            )
            ids += torch.randint(5, cfg.text.vocab_size, (n,), generator=g).tolist()
            index += [s] * n
        ids.append(3)
        index.append(-1)
        rows_ids.append(ids)
        rows_index.append(index)
    length = max(map(len, rows_ids)) + extra_pad
    batch = len(sentence_counts)
    input_ids = torch.zeros(batch, length, dtype=torch.long)
    mask = torch.zeros(batch, length, dtype=torch.long)
    sentence_index = torch.full((batch, length), -1, dtype=torch.long)
    for b, (ids, index) in enumerate(zip(rows_ids, rows_index)):
        input_ids[b, : len(ids)] = torch.tensor(ids)
        mask[b, : len(ids)] = 1
        sentence_index[b, : len(ids)] = torch.tensor(index)
    size = cfg.image.image_size
    return {
        "image": torch.randn(batch, 1, size, size, generator=g),
        "input_ids": input_ids,
        "attention_mask": mask,
        "sentence_index": sentence_index,
    }
