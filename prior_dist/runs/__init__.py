"""Run, checkpoint and export directories: their layout, and the writers and readers of each."""

from prior_dist.runs.export import export_model
from prior_dist.runs.layout import complete_checkpoints
from prior_dist.runs.load import LoadedModel, load_export, load_model, load_run

__all__ = [
    "LoadedModel",
    "complete_checkpoints",
    "export_model",
    "load_export",
    "load_model",
    "load_run",
]
