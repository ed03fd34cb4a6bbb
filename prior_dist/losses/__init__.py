"""PRIOR's losses as functions of tensors (no process group inside; gathers are passed in).

- `contrastive.py`: InfoNCE: the global image-report loss (and the generated report's, gpa),
  the intra-report local text loss;
- `simsiam.py`: the local image loss (SimSiam between patches and their report context);
- `reconstruction.py`: the prototype losses (proto L1, kl) and the reconstructions (image,
  generated sentences);
- `precision.py`: fp32 for the reductions.
The Hungarian matching the generation losses train on is the model's (`models/matching.py`).
"""

from prior_dist.losses.contrastive import (
    SingleProcessGather,
    global_contrastive_loss,
    intra_report_contrastive_loss,
)
from prior_dist.losses.reconstruction import (
    image_reconstruction_loss,
    prototype_kl_loss,
    prototype_l1_loss,
    sentence_generation_loss,
)
from prior_dist.losses.simsiam import simsiam_loss

__all__ = [
    "SingleProcessGather",
    "global_contrastive_loss",
    "image_reconstruction_loss",
    "intra_report_contrastive_loss",
    "prototype_kl_loss",
    "prototype_l1_loss",
    "sentence_generation_loss",
    "simsiam_loss",
]
