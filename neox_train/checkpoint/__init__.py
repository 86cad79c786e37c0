"""Checkpoints: tags, the local commit, save/load and retention, resume, and publication to a bucket (the prefix's
owner, the protocol, the upload worker and its journal)."""
