"""Pretraining: recipes, the DeepSpeed engine around the task, one optimizer step, the run."""
