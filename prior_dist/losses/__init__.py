"""PRIOR's losses as functions of tensors (no process group inside; gathers are passed in)."""

from prior_dist.losses.contrastive import (
    LocalGather,
    global_contrastive_loss,
    intra_report_contrastive_loss,
)
from prior_dist.losses.local import simsiam_loss
from prior_dist.losses.matching import align_to_targets, hungarian_assignment
from prior_dist.losses.reconstruction import (
    image_reconstruction_loss,
    prototype_kl_loss,
    prototype_l1_loss,
    sentence_generation_loss,
)

__all__ = [
    "LocalGather",
    "align_to_targets",
    "global_contrastive_loss",
    "hungarian_assignment",
    "image_reconstruction_loss",
    "intra_report_contrastive_loss",
    "prototype_kl_loss",
    "prototype_l1_loss",
    "sentence_generation_loss",
    "simsiam_loss",
]
