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

from prior_dist.data.tokenize import tokenize_sentences
from prior_dist.data.transforms import collate


@torch.no_grad()
def class_prompts(model, tokenizer, classes, prompt: str, max_tokens: int, device,
                  use_prototypes: bool):
    """(report embeddings [C, D], prompt sentences [C, 1, D], mask [C, 1])."""
    samples = []
    for name in classes:
        ids, index = tokenize_sentences(tokenizer, [prompt.format(name)], max_tokens)
        samples.append({"key": name, "image": torch.zeros(1, 1, 1), "input_ids": ids,
                        "sentence_index": index, "sentences": [prompt.format(name)],
                        "flipped": False})
    batch = collate(samples, tokenizer.pad_token_id, 1)
    text = model.encode_text(batch["input_ids"].to(device), batch["attention_mask"].to(device),
                             batch["sentence_index"].to(device))
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
        global_logits = model.global_scale * (image_global
                                              @ F.normalize(reports.float(), dim=-1).t())
        # Every (image, class) pair: the prompt sentence attends over that image's patches.
        patches = img.patch_tokens.repeat_interleave(num_classes, dim=0)
        prompt_rows = sentences.repeat(num_images, 1, 1)
        local = model.local_alignment(patches, prompt_rows, mask.repeat(num_images, 1))
        local_logits = model.local_scale * F.cosine_similarity(
            local.text_context[:, 0].float(), prompt_rows[:, 0].float(), dim=-1)
        global_sum = global_sum + global_logits.softmax(-1)
        local_sum = local_sum + local_logits.view(num_images, num_classes).softmax(-1)
    return global_sum, local_sum
