"""Checkpoints: tags, the local commit, save/load and retention, resume, publication to a bucket (owner, protocol, upload worker)."""
