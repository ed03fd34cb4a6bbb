"""Zero-shot classification (spec section 7) and its options for real report language.

The paper's setting (`PromptOptions()`): one prompt per class, "<class> is observed"; score per
class = softmax over classes of the global similarities + `local_weight` x softmax of the local
scores. The local score of a prompt is its intra-report score: the cosine between the prompt
sentence's image context (sentence-as-query local attention over the image's patches) and the
sentence itself, at the local logit scale. The prompt sentences are their own embeddings by
default; `through_bank` passes them through the prototype bank (deterministic at evaluation),
as the stage-2/3 losses see sentences, and retrieval makes the same choice for reports.

Options: several phrasings per class averaged in embedding space (CLIP, CheXzero); the
positive-vs-negative form ("X" against "no X", a softmax over the pair per class, which also
scores multi-label sets); the local weight chosen on a validation split. Global-only,
local-only and combined scores are always reported side by side.

Calibration (single-label): a prompt's wording shifts every image's score for its class alike
("There is {}." drew most images to one class on IU reports while the ranking per class, the
AUC, held). `calibrated` reports the combined score with one offset per class added to its log,
fitted on the selection split (where the local weight is chosen) by a regularised
cross-entropy, beside the raw one; per-class AUCs do not move.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from prior_dist.data.labels import CHEXPERT_COMPETITION
from prior_dist.data.tokenize import MAX_TOKENS, tokenize_sentences
from prior_dist.data.transforms import collate
from prior_dist.evaluation.inputs import DataOptions, image_batches, open_split
from prior_dist.evaluation.metrics import macro_auc, macro_f1
from prior_dist.runs import LoadedModel

DEFAULT_PROMPT = "{} is observed"
# `--prompt-set`: templates of the positive prompt. `paper` is the reference setting.
PROMPT_SETS = {
    "paper": (DEFAULT_PROMPT,),
    "ensemble": (
        DEFAULT_PROMPT,
        "there is {}",
        "findings consistent with {}",
        "{} is present",
        "{}",
    ),
}
# The negative prompts of the positive-vs-negative form.
NEGATIVE_PROMPTS = ("no {}", "there is no {}", "no evidence of {}")
# How reports write each class (the `ensemble` set uses these; `paper` the class name as is).
CLASS_PHRASES = {
    "Atelectasis": ("atelectasis",),
    "Cardiomegaly": ("cardiomegaly", "enlarged heart"),
    "Consolidation": ("consolidation",),
    "Edema": ("edema", "pulmonary edema"),
    "Enlarged Cardiomediastinum": ("enlarged cardiomediastinum", "widened mediastinum"),
    "Fracture": ("fracture",),
    "Lung Lesion": ("nodule", "mass", "lung lesion"),
    "Lung Opacity": ("opacity", "airspace opacity"),
    "No Finding": ("no acute cardiopulmonary abnormality",),
    "Pleural Effusion": ("pleural effusion", "effusion"),
    "Pneumonia": ("pneumonia",),
    "Pneumothorax": ("pneumothorax",),
    "Support Devices": ("support devices", "tube", "pacemaker"),
}
# `local_weight=None`: the weight with the best validation score among these.
WEIGHT_GRID = (0.0, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0)
# The class offsets' Gaussian prior (in log-score units): offsets of a few units are allowed,
# and a class the selection split lacks is not pushed far.
OFFSET_PRIOR_SD = 2.0


@dataclass(frozen=True)
class PromptOptions:
    """How classes become prompts and scores."""

    templates: tuple[str, ...] = (DEFAULT_PROMPT,)
    # Class names as written (the paper), or as reports write them (`CLASS_PHRASES`).
    phrases: bool = False
    form: Literal["classes", "pos_neg"] = "classes"
    negatives: tuple[str, ...] = NEGATIVE_PROMPTS
    # Prompt sentences through the prototype bank, as the stage-2/3 losses see sentences; off
    # by default: the bank can map several classes' prompts onto one prototype, which made
    # them score alike (docs/evaluation.md: chosen on validation splits over seeds).
    through_bank: bool = False

    def __post_init__(self) -> None:
        for template in (*self.templates, *self.negatives):
            if "{}" not in template:
                raise ValueError(f"zero-shot prompt {template!r} has no '{{}}' for the class")
        if self.form not in ("classes", "pos_neg"):
            raise ValueError(f"zero-shot form must be classes or pos_neg, got {self.form!r}")

    @classmethod
    def named(cls, name: str, form: str = "classes") -> PromptOptions:
        if name not in PROMPT_SETS:
            raise ValueError(f"--prompt-set {name!r}: one of {sorted(PROMPT_SETS)}")
        return cls(PROMPT_SETS[name], phrases=name != "paper", form=form)

    def texts(self, name: str, negative: bool = False) -> list[str]:
        """Every prompt of one class (and polarity)."""
        words = CLASS_PHRASES.get(name, (name.lower(),)) if self.phrases else (name,)
        return [
            t.format(w) for t in (self.negatives if negative else self.templates) for w in words
        ]

    def groups(self, classes) -> list[list[str]]:
        """The prompt groups scored against each image: one per class, then (pos_neg) one per
        class's negation."""
        positive = [self.texts(c) for c in classes]
        if self.form == "classes":
            return positive
        return positive + [self.texts(c, negative=True) for c in classes]


@torch.no_grad()
def encode_prompt_groups(model, tokenizer, groups, max_tokens: int, device, use_prototypes: bool):
    """Each group's prompts averaged in embedding space: (report embeddings [G, D], sentences
    [G, 1, D], mask [G, 1]); the global side averages the normalised report embeddings, the
    local side the (prototype-bank) sentence embeddings."""
    texts = [t for group in groups for t in group]
    samples = []
    for text in texts:
        ids, index = tokenize_sentences(tokenizer, [text], max_tokens)
        samples.append(
            {
                "key": text,
                "image": torch.zeros(1, 1, 1),
                "input_ids": ids,
                "sentence_index": index,
                "sentences": [text],
                "flipped": False,
            }
        )
    batch = collate(samples, tokenizer.pad_token_id, 1)
    encoded = model.encode_text(
        batch["input_ids"].to(device),
        batch["attention_mask"].to(device),
        batch["sentence_index"].to(device),
    )
    sentences, mask = encoded.sentences[:, :1], encoded.sentence_mask[:, :1]
    if use_prototypes:
        sentences = model.prototype_bank(sentences)
    reports = F.normalize(model.report_embedding(sentences, mask).float(), dim=-1)
    owner = torch.tensor([g for g, group in enumerate(groups) for _ in group], device=device)
    count = torch.bincount(owner, minlength=len(groups)).clamp(min=1)[:, None]
    mean_reports = torch.zeros(len(groups), reports.shape[1], device=device)
    mean_reports = mean_reports.index_add(0, owner, reports) / count
    flat = sentences[:, 0].float()
    mean_sentences = torch.zeros(len(groups), flat.shape[1], device=device)
    mean_sentences = (mean_sentences.index_add(0, owner, flat) / count)[:, None]
    group_mask = torch.ones(len(groups), 1, dtype=torch.bool, device=device)
    return mean_reports, mean_sentences.to(sentences.dtype), group_mask


@torch.no_grad()
def group_logits(model, images, prompts) -> tuple[torch.Tensor, torch.Tensor]:
    """Global and local logits `[N, G]` of every image against every prompt group."""
    reports, sentences, mask = prompts
    img = model.encode_image(images)
    image_global = F.normalize(img.global_embedding.float(), dim=-1)
    global_logits = model.global_scale * (image_global @ F.normalize(reports, dim=-1).t())
    num_images, num_groups = images.shape[0], reports.shape[0]
    # Every (image, group) pair: the prompt sentence attends over that image's patches.
    patches = img.patch_tokens.repeat_interleave(num_groups, dim=0)
    rows = sentences.repeat(num_images, 1, 1)
    local = model.local_alignment(patches, rows, mask.repeat(num_images, 1))
    local_logits = model.local_scale * F.cosine_similarity(
        local.text_context[:, 0].float(), rows[:, 0].float(), dim=-1
    )
    return global_logits.float(), local_logits.view(num_images, num_groups).float()


def class_probabilities(logits: torch.Tensor, form: str) -> torch.Tensor:
    """`[N, C]`: a softmax over the classes, or (pos_neg, logits `[N, 2C]` positives first)
    each class's softmax over its positive and negative prompt."""
    if form == "classes":
        return logits.softmax(-1)
    positive, negative = logits.chunk(2, dim=-1)
    return torch.stack([positive, negative], -1).softmax(-1)[..., 0]


@torch.no_grad()
def score_split(loaded, dataset, columns, prompts, form: str, batch_size: int) -> dict:
    """Global and local class probabilities `[N, C]` and labels `[N, C]` (NaN unknown) of
    every image of `dataset`."""
    model = loaded.model
    device = next(model.parameters()).device
    parts = {"global": [], "local": [], "labels": []}
    for images, labels in image_batches(loaded, dataset, batch_size):
        global_logits, local_logits = group_logits(model, images.to(device), prompts)
        parts["global"].append(class_probabilities(global_logits, form).cpu())
        parts["local"].append(class_probabilities(local_logits, form).cpu())
        parts["labels"].append(labels[:, columns])
    if not parts["labels"]:
        raise ValueError(f"{dataset.name} [{dataset.split}]: no images")
    return {k: torch.cat(v) for k, v in parts.items()}


def _single_label(scored: dict) -> tuple[dict, torch.Tensor]:
    """The images positive for exactly one of the classes, and that class's index. A class a
    report does not mention (NaN) counts as absent, as in CheXpert-style sets; an uncertain
    one (-1) leaves the image out."""
    labels = scored["labels"]
    single = ((labels == 1).sum(1) == 1) & ~(labels == -1).any(1)
    kept = {k: v[single] for k, v in scored.items()}
    return kept, (kept["labels"] == 1).int().argmax(1)


def _certain(scored: dict) -> torch.Tensor:
    """Labels with the uncertain (-1) ones unknown (NaN), for per-class AUCs."""
    return scored["labels"].masked_fill(scored["labels"] == -1, float("nan"))


def _selection_metric(scored: dict, weight: float, multi_label: bool) -> float:
    """What the local weight is chosen by: macro AUC (multi-label) or accuracy."""
    if multi_label:
        return macro_auc(_score_parts(scored, weight)["combined"], _certain(scored))[0]
    kept, target = _single_label(scored)
    combined = _score_parts(kept, weight)["combined"]
    return float((combined.argmax(1) == target).double().mean()) if len(target) else float("nan")


def choose_local_weight(scored: dict, multi_label: bool) -> tuple[float, dict[str, float]]:
    """The weight of `WEIGHT_GRID` with the best score on `scored` (the first of equals), and
    the score of every weight."""
    sweep = {str(w): _selection_metric(scored, w, multi_label) for w in WEIGHT_GRID}
    scores = [sweep[str(w)] for w in WEIGHT_GRID]
    if all(math.isnan(x) for x in scores):
        raise ValueError("no image of the selection split can score the local weight")
    best = max(range(len(scores)), key=lambda i: -math.inf if math.isnan(scores[i]) else scores[i])
    return WEIGHT_GRID[best], sweep


def _selection(loaded, data, split, options, scoring) -> tuple[dict | None, str]:
    """The scores of selection split `split` (None and why, when it has no image to score:
    e.g. a public set with a test split only). `scoring`: (columns, prompt groups, form, batch
    size), as for the reported split."""
    columns, groups, form, batch_size = scoring
    try:
        dataset = open_split(data, split, options)
        return score_split(loaded, dataset, columns, groups, form, batch_size), ""
    except (ValueError, FileNotFoundError, KeyError) as err:
        return None, str(err)


def _weight_from(selection: dict | None, why: str, split: str, multi_label: bool):
    """The local weight chosen on the selection split, and how; the paper's 0.5 when that split
    cannot score it (`why`, or the choice's own reason), said in the result."""
    if selection is not None:
        try:
            weight, sweep = choose_local_weight(selection, multi_label)
            return weight, {"split": split, "sweep": sweep}
        except ValueError as err:
            why = str(err)
    print(f"evaluate: local weight: {split} split unusable ({why}); using the paper's 0.5")
    return 0.5, {"split": split, "fallback": f"the paper's 0.5: {why}"}


def fit_class_offsets(
    scores_NC: torch.Tensor, target_N: torch.Tensor, prior_sd: float = OFFSET_PRIOR_SD
) -> torch.Tensor:
    """Offsets `[C]` (summing to 0) that maximise the likelihood of `target` under
    softmax(log scores + offsets), with a N(0, prior_sd²) prior on each offset: a convex
    problem, solved by L-BFGS in float64."""
    logs = scores_NC.double().clamp_min(1e-12).log()
    weight = 1.0 / (prior_sd**2 * len(target_N))
    offsets = torch.zeros(logs.shape[1], dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        solver = torch.optim.LBFGS(
            [offsets],
            lr=1.0,
            max_iter=500,
            tolerance_grad=1e-12,
            tolerance_change=1e-15,
            line_search_fn="strong_wolfe",
        )

        def objective():
            solver.zero_grad()
            loss = F.cross_entropy(logs + offsets, target_N) + weight / 2 * offsets.square().sum()
            loss.backward()
            return loss

        solver.step(objective)
    found = offsets.detach()
    return (found - found.mean()).float()


def _calibrated(selection, why, split, test, target, classes, weight) -> dict:
    """The combined score of the reported split with class offsets fitted on the selection
    split at the same local weight, scored as the raw one; or why not."""
    if selection is None:
        return {"fitted_on": split, "skipped": why}
    kept, fit_target = _single_label(selection)
    if not len(fit_target):
        return {"fitted_on": split, "skipped": f"no image with exactly one of {list(classes)}"}
    offsets = fit_class_offsets(_score_parts(kept, weight)["combined"], fit_target)
    scores = _score_parts(test, weight)["combined"].clamp_min(1e-12).log() + offsets
    return {
        **classification_scores(scores, target, classes),
        "fitted_on": split,
        "fit_images": len(fit_target),
        "offsets": dict(zip(classes, offsets.tolist())),
    }


@torch.no_grad()
def zero_shot(
    loaded: LoadedModel,
    data: str,
    split: str,
    classes=None,
    prompts: PromptOptions | None = None,
    local_weight: float | None = None,
    options: DataOptions | None = None,
    batch_size: int = 64,
    multi_label: bool = False,
    select_split: str = "validate",
) -> dict:
    """Global-only, local-only and combined (`global + local_weight x local`) scores over
    `split`: single-label (accuracy, macro F1, per-class AUC and the confusion matrix over the
    images that carry exactly one of `classes`) or `multi_label` (per-class AUC over every image
    whose label is known). `local_weight=None` (the default) picks it on `select_split`; the
    paper's is 0.5. Single-label results add `calibrated`: the combined score with class
    offsets fitted on `select_split` (`fit_class_offsets`)."""
    prompts = prompts or PromptOptions()
    if multi_label and prompts.form != "pos_neg":
        raise ValueError("multi-label zero-shot scores each class alone: use the pos_neg form")
    model = loaded.model
    device = next(model.parameters()).device
    dataset = open_split(data, split, options)
    classes = tuple(classes or (dataset.classes if dataset.exclusive else CHEXPERT_COMPETITION))
    missing = [c for c in classes if c not in dataset.classes]
    if missing:
        raise ValueError(f"{data}: classes {missing} not in its labels {list(dataset.classes)}")
    columns = [dataset.classes.index(c) for c in classes]
    groups = encode_prompt_groups(
        model, loaded.tokenizer, prompts.groups(classes), MAX_TOKENS, device, prompts.through_bank
    )
    scored = score_split(loaded, dataset, columns, groups, prompts.form, batch_size)
    result = {"classes": list(classes), "prompts": prompts.groups(classes), "form": prompts.form}
    scoring = (columns, groups, prompts.form, batch_size)
    if split == select_split:  # e.g. pretraining's periodic evaluation on `validate`
        selection, why = scored, ""
    elif multi_label and local_weight is not None:
        selection, why = None, "nothing to select"
    else:
        selection, why = _selection(loaded, data, select_split, options, scoring)
    if local_weight is None:
        local_weight, result["local_weight_chosen_on"] = _weight_from(
            selection, why, select_split, multi_label
        )
    result["local_weight"] = local_weight
    result["sweep"] = {str(w): _selection_metric(scored, w, multi_label) for w in WEIGHT_GRID}
    if multi_label:
        return result | _multi_label_scores(scored, classes, local_weight)
    kept, target = _single_label(scored)
    if not len(target):
        raise ValueError(f"{data} [{split}]: no image with exactly one of {list(classes)}")
    parts = _score_parts(kept, local_weight)
    counts = torch.bincount(target, minlength=len(classes))
    return result | {
        "images": len(target),
        "chance": 1 / len(classes),
        "majority": float(counts.max() / counts.sum()),
        **{name: classification_scores(s, target, classes) for name, s in parts.items()},
        "calibrated": _calibrated(
            selection, why, select_split, kept, target, classes, local_weight
        ),
    }


def headline_accuracy(result: dict) -> tuple[float, str]:
    """A single-label result's accuracy as the commands print it first: with the class offsets
    where they were fitted (over 3 pretraining seeds on IU reports they raised the default
    prompt's accuracy on every seed, docs/results.md), else the raw combined score; and how."""
    calibrated = result.get("calibrated") or {}
    if "accuracy" in calibrated:
        return calibrated["accuracy"], f"with class offsets from {calibrated['fitted_on']}"
    return result["combined"]["accuracy"], "raw"


def _score_parts(scored: dict, local_weight: float) -> dict[str, torch.Tensor]:
    """The three scores every result reports side by side."""
    return {
        "combined": scored["global"] + local_weight * scored["local"],
        "global_only": scored["global"],
        "local_only": scored["local"],
    }


def _multi_label_scores(scored: dict, classes, local_weight: float) -> dict:
    """Per-class AUC over the images whose label is 1 or 0 (unmentioned and uncertain left
    out)."""
    labels = _certain(scored)
    parts = _score_parts(scored, local_weight)
    out = {"images": len(labels), "positives": dict(zip(classes, (labels == 1).sum(0).tolist()))}
    for name, scores in parts.items():
        auc, per_class = macro_auc(scores, labels)
        out[name] = {"macro_auc": auc, "per_class_auc": dict(zip(classes, per_class))}
    return out


def classification_scores(scores_NC: torch.Tensor, target_N: torch.Tensor, classes) -> dict:
    """Accuracy, macro F1, macro and per-class AUC, per-class accuracy, the share of each
    predicted class and the confusion matrix (rows: true class, columns: predicted class) of
    single-label predictions."""
    num = len(classes)
    predicted = scores_NC.argmax(1).cpu()
    auc, per_class = macro_auc(scores_NC.cpu(), F.one_hot(target_N, num))
    confusion = torch.bincount(target_N * num + predicted, minlength=num**2).view(num, num)
    shares = torch.bincount(predicted, minlength=num).double() / len(predicted)
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
        # A score that puts most images in one class shows here first.
        "predicted_share": dict(zip(classes, shares.tolist())),
        "confusion": confusion.tolist(),
    }
