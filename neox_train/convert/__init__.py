"""Conversion between neox-train checkpoints and HuggingFace folders."""

# neox-convert-hf's defaults, which to_hf.options() gives its other callers too (here: importing
# them loads nothing heavy, so the command's parser can).
DEFAULT_TAG = "latest"
DEFAULT_MAX_SHARD_SIZE = "2GB"
