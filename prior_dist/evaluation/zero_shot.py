"""Zero-shot classification (spec section 7): one prompt per class, "<class> is observed".

Score per class = softmax over classes of the global similarities + `local_weight` x softmax of
the local scores. The local score of a class is the intra-report score of its prompt: the
cosine between the prompt sentence's image context (sentence-as-query local attention over the
image's patches) and the prompt sentence itself, at the local logit scale. After stage 1 the
prompt sentences go through the prototype bank (deterministic at evaluation), as the training
losses see them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prior_dist.data.labels import CHEXPERT_COMPETITION
from prior_dist.data.tokenize import tokenize_sentences
from prior_dist.data.transforms import collate
from prior_dist.evaluation.inputs import DataOptions, image_batches, open_split
from prior_dist.evaluation.metrics import macro_auc, macro_f1
from prior_dist.runs import LoadedModel

DEFAULT_PROMPT = "{} is observed"


@torch.no_grad()
def class_prompts(
    model, tokenizer, classes, prompt: str, max_tokens: int, device, use_prototypes: bool
):
    """(report embeddings [C, D], prompt sentences [C, 1, D], mask [C, 1])."""
    samples = []
    for name in classes:
        ids, index = tokenize_sentences(tokenizer, [prompt.format(name)], max_tokens)
        samples.append(
            {
                "key": name,
                "image": torch.zeros(1, 1, 1),
                "input_ids": ids,
                "sentence_index": index,
                "sentences": [prompt.format(name)],
                "flipped": False,
            }
        )
    batch = collate(samples, tokenizer.pad_token_id, 1)
    text = model.encode_text(
        batch["input_ids"].to(device),
        batch["attention_mask"].to(device),
        batch["sentence_index"].to(device),
    )
    sentences, mask = text.sentences[:, :1], text.sentence_mask[:, :1]
    if use_prototypes:
        sentences = model.prototype_bank(sentences)
    return model.report_embedding(sentences, mask), sentences, mask


@torch.no_grad()
def zero_shot_parts(model, images, prompt_sets) -> tuple[torch.Tensor, torch.Tensor]:
    """`[N, C]` softmax over classes of the global and of the local scores, each summed over
    the prompt sets (`class_prompts` outputs); the images are encoded once for all of them.
    The paper's score is `global + 0.5 * local`."""
    img = model.encode_image(images)
    image_global = F.normalize(img.global_embedding.float(), dim=-1)
    global_sum, local_sum = 0.0, 0.0
    for reports, sentences, mask in prompt_sets:
        num_images, num_classes = images.shape[0], reports.shape[0]
        global_logits = model.global_scale * (
            image_global @ F.normalize(reports.float(), dim=-1).t()
        )
        # Every (image, class) pair: the prompt sentence attends over that image's patches.
        patches = img.patch_tokens.repeat_interleave(num_classes, dim=0)
        prompt_rows = sentences.repeat(num_images, 1, 1)
        local = model.local_alignment(patches, prompt_rows, mask.repeat(num_images, 1))
        local_logits = model.local_scale * F.cosine_similarity(
            local.text_context[:, 0].float(), prompt_rows[:, 0].float(), dim=-1
        )
        global_sum = global_sum + global_logits.softmax(-1)
        local_sum = local_sum + local_logits.view(num_images, num_classes).softmax(-1)
    return global_sum, local_sum


@torch.no_grad()
def zero_shot(
    loaded: LoadedModel,
    data: str,
    split: str,
    classes=None,
    prompts=(DEFAULT_PROMPT,),
    local_weight: float = 0.5,
    options: DataOptions | None = None,
    batch_size: int = 64,
) -> dict:
    """Accuracy, macro F1, per-class AUC and the confusion matrix of the paper's score and of
    the global-only score, over the images of `split` that carry exactly one of `classes`."""
    model = loaded.model
    device = next(model.parameters()).device
    dataset = open_split(data, split, options)
    classes = tuple(classes or (dataset.classes if dataset.exclusive else CHEXPERT_COMPETITION))
    missing = [c for c in classes if c not in dataset.classes]
    if missing:
        raise ValueError(f"{data}: classes {missing} not in its labels {list(dataset.classes)}")
    columns = [dataset.classes.index(c) for c in classes]
    per_prompt = [
        class_prompts(model, loaded.tokenizer, classes, p, 256, device, True) for p in prompts
    ]
    combined, global_only, targets = [], [], []
    for images, labels in image_batches(loaded, dataset, batch_size):
        labels = labels[:, columns]
        single = (labels.nan_to_num(0).sum(1) == 1) & ~labels.isnan().any(1)
        if not bool(single.any()):
            continue
        images = images[single].to(device)
        global_part, local_part = zero_shot_parts(model, images, per_prompt)
        combined.append((global_part + local_weight * local_part).float().cpu())
        global_only.append(global_part.float().cpu())
        targets.append(labels[single].argmax(1))
    if not targets:
        raise ValueError(f"{data} [{split}]: no image with exactly one of {list(classes)}")
    target = torch.cat(targets)
    return {
        "images": len(target),
        "classes": list(classes),
        "prompts": list(prompts),
        "chance": 1 / len(classes),
        "paper_score": classification_scores(torch.cat(combined), target, classes),
        "global_only": classification_scores(torch.cat(global_only), target, classes),
    }


def classification_scores(scores_NC: torch.Tensor, target_N: torch.Tensor, classes) -> dict:
    """Accuracy, macro F1, macro and per-class AUC, per-class accuracy and the confusion matrix
    (rows: true class, columns: predicted class) of single-label predictions."""
    num = len(classes)
    predicted = scores_NC.argmax(1).cpu()
    auc, per_class = macro_auc(scores_NC.cpu(), F.one_hot(target_N, num))
    confusion = torch.bincount(target_N * num + predicted, minlength=num**2).view(num, num)
    return {
        "accuracy": float((predicted == target_N).double().mean()),
        "macro_f1": macro_f1(predicted, target_N, num),
        "macro_auc": auc,
        "per_class_auc": dict(zip(classes, per_class)),
        "per_class_accuracy": {
            c: float((predicted[target_N == i] == i).double().mean())
            if bool((target_N == i).any())
            else None
            for i, c in enumerate(classes)
        },
        "confusion": confusion.tolist(),
    }
