"""Image-report retrieval on a shard split: Recall@K and median rank both ways (no labels
needed), and Precision@K by label where the split has labels among the classes.

Report sentences go through the prototype bank only with `through_bank`, the same choice and
default as zero-shot's prompts (`PromptOptions.through_bank`, `--bank`, `eval.bank`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prior_dist.data.labels import CHEXPERT_COMPETITION
from prior_dist.data.progress import bar
from prior_dist.evaluation.inputs import report_loader
from prior_dist.evaluation.metrics import precision_at_k, retrieval_metrics
from prior_dist.runs import LoadedModel


@torch.no_grad()
def embeddings(
    loaded: LoadedModel,
    data: str,
    split: str,
    labels,
    batch_size: int = 64,
    through_bank: bool = False,
):
    """(image globals, report embeddings: both normalised; pooled patch tokens; labels, NaN
    where a sample has none)."""
    model = loaded.model
    device = next(model.parameters()).device
    images, reports, pooled, all_labels = [], [], [], []
    for batch in bar(
        report_loader(loaded, data, split, labels, batch_size), desc="embed", unit="batch"
    ):
        img = model.encode_image(batch["image"].to(device))
        txt = model.encode_text(
            batch["input_ids"].to(device),
            batch["attention_mask"].to(device),
            batch["sentence_index"].to(device),
        )
        sentences = model.prototype_bank(txt.sentences) if through_bank else txt.sentences
        images.append(F.normalize(img.global_embedding.float(), dim=-1).cpu())
        reports.append(
            F.normalize(model.report_embedding(sentences, txt.sentence_mask).float(), dim=-1).cpu()
        )
        pooled.append(img.patch_tokens.float().mean(1).cpu())
        all_labels.append(batch["labels"])
    return torch.cat(images), torch.cat(reports), torch.cat(pooled), torch.cat(all_labels)


def retrieval(
    loaded: LoadedModel,
    data: str,
    split: str,
    classes=CHEXPERT_COMPETITION,
    batch_size: int = 64,
    through_bank: bool = False,
) -> dict:
    """Recall@K and median rank both ways; Precision@K: the share of the top K whose findings
    over `classes` equal the query's (a class a report does not mention counts as absent).
    Where no sample of the split carries a label among `classes` (a hospital's own reports),
    Precision@K is left out with a note: it would read 0 for any model."""
    classes = list(classes)
    images, reports, _, labels = embeddings(loaded, data, split, classes, batch_size, through_bank)
    similarity = images @ reports.t()
    result = {
        "pairs": len(images),
        "through_bank": through_bank,
        "image_to_text": retrieval_metrics(similarity),
        "text_to_image": retrieval_metrics(similarity.t()),
    }
    if len(labels) and bool(torch.isnan(labels).all()):
        result["note"] = (
            f"precision@K left out: none of the {len(labels)} samples carries a label among "
            f"{classes} (pass --classes with labels the shards have); Recall@K needs none"
        )
        return result
    labels = torch.nan_to_num(labels, nan=0.0)
    result["image_to_text"].update(precision_at_k(similarity, labels, labels))
    result["text_to_image"].update(precision_at_k(similarity.t(), labels, labels))
    return result
