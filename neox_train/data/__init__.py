"""Training data: token shards, windows and sampling, the prefetching loader, and
`neox-data prepare`."""
