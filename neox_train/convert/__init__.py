"""Conversion between neox-train checkpoints and HuggingFace folders."""
