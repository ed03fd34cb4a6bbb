"""Evaluation of pretrained PRIOR models: one module per task (zero-shot, retrieval, linear
probe, segmentation and detection), downstream data adapters, metrics."""
