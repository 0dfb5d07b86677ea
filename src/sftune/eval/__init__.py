"""Evaluation of fine-tuned models: generations on held-out rows, scored against references."""
