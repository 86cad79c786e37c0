"""A checkpoint in a bucket: published once complete locally, by the run that owns the prefix, never
changed."""
