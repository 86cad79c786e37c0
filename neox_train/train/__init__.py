"""The training run: planning, the loop, performance accounting, metrics."""
