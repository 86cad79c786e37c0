"""Downstream evaluation: a checkpoint (local or gs://, any ZeRO stage and world size) converted to
HuggingFace by convert/, scored by lm-evaluation-harness, its results stored beside the run's tags
under eval/ and logged to the run's trackers at the checkpoint's step.

- harness.py: the tasks (the Pythia paper's zero-shot set by default), their up-front check, one
  lm_eval run and its results cut per task.
- results.py: eval/TAG/TASK.json at the checkpoints' location, written once, never inside a tag;
  also the state of `--watch` (a task is done when its file exists).
- evaluate.py: one checkpoint (locate, convert, evaluate, store, log), and the watch loop.
"""
