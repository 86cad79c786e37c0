"""Checkpoints, in two rooms and a door between them:

  local/    a checkpoint on this machine's disk: tags, the save (snapshot, writer, our DeepSpeed
            checkpoint engine, the saver), the local commit that makes a tag count, loading,
            retention, the save-dir lock. Knows nothing of buckets.
  publish/  a checkpoint in a bucket: who may publish under a prefix (owner), the journal, the
            protocol (parts, manifest, COMPLETE, latest), the upload process, and `Publisher`, the
            trainer's one handle on it; reading published checkpoints back (fetch).
  resume.py which checkpoint a start continues from, here or in the bucket: reads both rooms.

A tag's walk from the loop to the bucket reads downward: train.checkpoints -> local.saver ->
local.commit, then publish.publisher -> publish.journal -> publish.process -> publish.protocol ->
remote.rsync.
"""
