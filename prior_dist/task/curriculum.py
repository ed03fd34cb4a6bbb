"""PRIOR's three-stage curriculum (spec section 6) as a pure function of the stage."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

LOSS_NAMES = ("global", "local_image", "local_text", "proto", "rec_image", "spg", "kl", "gpa")

_STAGE_WEIGHTS = {
    1: {"global": 1.0, "local_image": 1.0, "local_text": 1.0},
    2: {"global": 1.0, "local_image": 1.0, "local_text": 1.0, "proto": 10.0},
    3: {
        "global": 10.0,
        "local_image": 1.0,
        "local_text": 1.0,
        "rec_image": 1.0,
        "spg": 10.0,
        "kl": 1.0,
        "gpa": 1.0,
        "proto": 10.0,
    },
}


@dataclass(frozen=True)
class StagePlan:
    stage: int
    weights: Mapping[str, float] = field(default_factory=dict)  # only the losses that run
    use_prototypes: bool = False  # SPB prototypes replace sentences in the alignment losses
    max_sentences: int | None = None

    def runs(self, loss: str) -> bool:
        return loss in self.weights

    @property
    def reconstruction(self) -> bool:
        return any(self.runs(name) for name in ("rec_image", "spg", "kl", "gpa"))


def stage_plan(
    stage: int, *, sentence_cap: int = 16, weights: Mapping[int, Mapping[str, float]] | None = None
) -> StagePlan:
    """Which losses run in `stage` (1, 2, 3), their weights, prototypes on/off, sentence cap.

    `weights` overrides the spec's per-stage weights (same keys); a zero weight drops a loss.
    """
    if stage not in _STAGE_WEIGHTS:
        raise ValueError(f"stage must be 1, 2 or 3, got {stage!r}")
    chosen = dict((weights or {}).get(stage, _STAGE_WEIGHTS[stage]))
    unknown = set(chosen) - set(LOSS_NAMES)
    if unknown:
        raise ValueError(
            f"stage {stage}: unknown loss name(s) {sorted(unknown)}; allowed: {list(LOSS_NAMES)}"
        )
    chosen = {name: float(w) for name, w in chosen.items() if w}
    if any(w < 0 for w in chosen.values()):
        raise ValueError(f"stage {stage}: loss weights must be >= 0, got {chosen}")
    if sentence_cap < 1:
        raise ValueError(f"sentence_cap must be >= 1, got {sentence_cap}")
    return StagePlan(
        stage=stage,
        weights=MappingProxyType(chosen),
        use_prototypes=stage >= 2,
        max_sentences=sentence_cap if stage == 3 else None,
    )
