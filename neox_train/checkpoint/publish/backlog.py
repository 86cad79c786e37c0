"""What a save dir holds that is not published yet, published by hand: `neox-sync --checkpoints`
finishes the uploads a training run left behind (a crash, a dead endpoint, a flush cut short),
through the same protocol as the trainer's upload process.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from neox_train.checkpoint.local import commit
from neox_train.checkpoint.local.tags import local_tags
from neox_train.checkpoint.publish.owner import Identity, PrefixOwned, claim_if_unowned, new_id
from neox_train.checkpoint.publish.protocol import (
    CheckpointConflict,
    CheckpointIncomplete,
    finalize_checkpoint,
    upload_checkpoint_part,
)
from neox_train.errors import StorageError
from neox_train.remote.base import Backend
from neox_train.remote.rsync import SyncResult


def publish_checkpoints(save_dir: Path, backend: Backend, *, workers: int = 8,
                        progress: bool = False) -> SyncResult:
    """Publish the complete SAVE_DIR/global_step* tags (single node: one part each), oldest first:
    what `neox-sync
    --checkpoints` runs to finish uploads a training run left unpublished. Incomplete tags (a save
    that never finished) are never published; tags that belong to another run than the prefix's
    owner, or that are already published with other content, are left alone. Both kinds are listed
    in `not_published` with the reason. Already COMPLETE identical tags cost a listing."""
    save_dir = Path(save_dir)
    if not save_dir.is_dir():
        raise StorageError(f"{save_dir} is not a folder (expected a checkpoint save dir with "
                           "global_step* folders)")
    tags = local_tags(save_dir)
    if not tags:
        raise StorageError(f"{save_dir} has no global_step* checkpoint folders to publish")
    total = SyncResult()
    started = time.monotonic()
    legacy_id = new_id()  # tags from before run ids: published as one run
    for tag in tags:
        status = commit.inspect(save_dir, tag)
        if not status.complete:
            total.not_published[tag] = f"not complete locally: {status.problem}"
            continue
        identity = Identity(status.run_id or legacy_id)
        try:
            claim_if_unowned(backend, identity, save_dir=str(save_dir))
            part = upload_checkpoint_part(save_dir, tag, backend, identity=identity,
                                          workers=workers)
            if not finalize_checkpoint(backend, tag, identity=identity, num_nodes=1):
                raise StorageError(  # pragma: no cover
                    f"{backend.url}/{tag}: its part vanished while publishing")
        except (CheckpointConflict, CheckpointIncomplete, PrefixOwned) as e:
            total.not_published[tag] = str(e)
            continue
        total.published.append(tag)
        for name in ("files_uploaded", "files_skipped", "bytes_uploaded", "retries"):
            setattr(total, name, getattr(total, name) + getattr(part, name))
        if progress:
            print(f"neox-sync: published {tag} ({part.files_uploaded} uploaded, "
                  f"{part.files_skipped} skipped)",
                  file=sys.stderr)
    total.seconds = time.monotonic() - started
    return total
