"""Where evaluation results live: `eval/TAG/TASK.json` at the checkpoints' own location (a run's
save dir, a published folder, a gs:// prefix), beside the tags and never inside one, so a
published tag stays exactly as published.

Each file is written once (a create-only conditional write): two watchers that race store one
result, and the files are the watch's state, so a restarted `neox-eval --watch` skips what is there.
Publishing, retention and resume never look at eval/ (a tag is a top-level name with a completeness
marker).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from neox_train.checkpoint.local import commit
from neox_train.checkpoint.local.tags import RUN_JSON, local_tags
from neox_train.checkpoint.publish.fetch import remote_checkpoints
from neox_train.checkpoint.publish.protocol import COMPLETE, MANIFEST
from neox_train.errors import ConfigError
from neox_train.remote import open_backend
from neox_train.remote.base import Backend, RemoteChanged

PREFIX = "eval"


def result_name(tag: str, task: str) -> str:
    return f"{PREFIX}/{tag}/{task}.json"


@dataclass
class Location:
    """A run's checkpoints: a gs:// prefix, a published folder (the bucket layout on disk) or a
    save dir (local completeness markers)."""

    source: str
    backend: Backend
    folder: Path | None  # on local disk: the folder
    published: bool

    @classmethod
    def open(cls, source: str, *, credentials: str | None) -> "Location":
        if "://" in source and not source.startswith("file://"):
            return cls(source, open_backend(source, credentials=credentials), None, True)
        folder = Path(source.removeprefix("file://")).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"{source} does not exist or is not a folder (expected a run's save "
                              "dir, a published folder, or gs://bucket/prefix)")
        # A published folder has tags with COMPLETE or a manifest; a save dir never has either
        # (looked up by name: a folder's listing would hash every file of every checkpoint).
        published = any((folder / t / n).is_file()
                        for t in local_tags(folder) for n in (MANIFEST, COMPLETE))
        return cls(source, open_backend(str(folder)), folder, published)

    def complete_tags(self) -> list[str]:
        """Tags that are complete (COMPLETE + manifest when published, the local commit marker in
        a save dir), oldest first."""
        if self.folder is None:
            return remote_checkpoints(self.backend)
        if self.published:
            return [t for t in local_tags(self.folder)
                    if (self.folder / t / COMPLETE).is_file()
                    and (self.folder / t / MANIFEST).is_file()]
        return commit.complete_tags(self.folder)

    def run_json(self, tag: str) -> dict:
        """The tag's run.json (run config, run id, step), {} when it has none or it is damaged."""
        raw = self.backend.read_bytes(f"{tag}/{RUN_JSON}")
        try:
            run = json.loads(raw) if raw else {}
        except ValueError:
            return {}
        return run if isinstance(run, dict) else {}

    def missing(self, tag: str, tasks: list[str]) -> list[str]:
        """The tasks with no result for `tag` yet."""
        if self.folder is not None:
            return [t for t in tasks if not (self.folder / result_name(tag, t)).is_file()]
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
