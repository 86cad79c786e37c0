"""Experiment trackers (W&B, MLflow) beside the TensorBoard files: a run's metrics and configs go to
the tracker runs its team watches, without ever stopping or slowing training.

- sender.py: one tracker behind a bounded queue and its own thread: nothing the tracker does (a slow
  or dead server, a refused start) reaches the loop; what it cannot take is dropped and counted.
  It also keeps the tracker's steps going forward: a resume or a rollback does not send a step the
  tracker already holds.
- sinks.py: the W&B and MLflow runs themselves, keyed by the run id that travels in the
  checkpoint, so a resume (another process, another GPU count, another machine) continues the same
  tracker run.
- trackers.py: the set a run reports to (report_to), and the one-line error naming the extra to
  install when a tracker's package is missing.
"""
