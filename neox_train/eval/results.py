"""Where evaluation results live: `eval/TAG/TASK.json` at the checkpoints' own location (a run's
save dir, a published folder, a gs:// prefix), beside the tags and never inside one, so a
published tag stays exactly as published.

Each file is written once (a create-only conditional write): two watchers that race write one
result, and the files are the watch's state, so a restarted `neox-eval --watch` skips what is there.
Publishing never looks at eval/ (a tag is a top-level name with a COMPLETE marker).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from neox_train.checkpoint.local import commit
from neox_train.checkpoint.local.tags import TAG_RE, step_of_tag
from neox_train.checkpoint.publish.fetch import remote_checkpoints
from neox_train.errors import ConfigError
from neox_train.remote import open_backend
from neox_train.remote.base import Backend, RemoteChanged

PREFIX = "eval"


def result_name(tag: str, task: str) -> str:
    return f"{PREFIX}/{tag}/{task}.json"


@dataclass
class Location:
    """A run's checkpoints: a save dir (local commit markers) or a published prefix."""

    source: str
    backend: Backend
    published: bool

    @classmethod
    def open(cls, source: str, *, credentials: str | None) -> "Location":
        if "://" not in source and not Path(source).expanduser().is_dir():
            raise ConfigError(f"{source} does not exist or is not a folder (expected a run's save "
                              "dir, a published folder, or gs://bucket/prefix)")
        backend = open_backend(source, credentials=credentials)
        published = "://" in source or bool(remote_checkpoints(backend))
        return cls(source, backend, published)

    def complete_tags(self) -> list[str]:
        """Tags that are complete (COMPLETE + manifest when published, the local commit marker in
        a save dir), oldest first."""
        if self.published:
            return remote_checkpoints(self.backend)
        tags = [t for t in commit.complete_tags(self.backend.root) if TAG_RE.match(t)]
        return sorted(tags, key=lambda t: step_of_tag(t) or 0)

    def missing(self, tag: str, tasks: list[str]) -> list[str]:
        """The tasks with no result for `tag` yet."""
        held = self.backend.list(f"{PREFIX}/{tag}/")
        return [t for t in tasks if result_name(tag, t) not in held]

    def write(self, tag: str, task: str, record: dict) -> bool:
        """Store one result; False when another process stored it first (kept as it is)."""
        data = (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()
        try:
            self.backend.write_bytes(result_name(tag, task), data, generation=0)
        except RemoteChanged:
            return False
        return True
