"""Where the checkpoint to convert is: a save dir, one tag folder, or a published prefix (gs:// or a
folder in the bucket layout), resolved to one verified tag folder on local disk.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from neox_train.checkpoint.local import commit
from neox_train.checkpoint.local.tags import TAG_RE, local_tags
from neox_train.checkpoint.publish.fetch import fetch_checkpoint, remote_checkpoints, remote_latest
from neox_train.errors import ConvertError
from neox_train.remote import open_backend


@dataclass
class Located:
    """A checkpoint tag folder on local disk, and how it got there."""

    tag_dir: Path
    source: str  # what the user named (folder or URL), for messages and the model card
    remote: str | None = None  # the bucket URL it was fetched from (verified against its manifest)
    cleanup: Callable[[], None] = field(default=lambda: None)


def _is_published(folder: Path) -> bool:
    """A bucket-layout folder (sync.py): some tag has a manifest or COMPLETE marker. A save dir
    never has either."""
    return any((folder / t / name).is_file()
               for t in local_tags(folder) for name in ("manifest.json", "COMPLETE"))


def _looks_like_tag_dir(folder: Path) -> bool:
    return any(folder.glob("*model_states.pt"))


def _check_intact(tag_dir: Path) -> None:
    """A tag with a completeness marker must be complete and match it byte for byte (read once here,
    before the conversion reads it again). One without a marker (written before neox-train had them,
    or by something else) goes to the conversion's own checks, with a note."""
    if not (tag_dir / commit.MARKER).exists():
        status = commit.inspect(tag_dir.parent, tag_dir.name)
        if not status.legacy:
            print(f"neox-convert-hf: {tag_dir} has no completeness marker (written before "
                  "neox-train had them, or not by neox-train): converting it as it is, with the "
                  "conversion's own checks", file=sys.stderr)
        return
    status = commit.inspect(tag_dir.parent, tag_dir.name)
    problem = status.problem or commit.verify(tag_dir.parent, status)
    if problem:
        raise ConvertError(f"checkpoint {tag_dir} is damaged or incomplete: {problem}")


def locate(source: str, tag: str | None, *, credentials: str | None,
           scratch_parent: Path) -> Located:
    """Resolve CHECKPOINT (+ --tag) to one tag folder on local disk.

    gs:// and file:// URLs are published checkpoint prefixes: only a COMPLETE tag is used, fetched
    with sync.fetch_checkpoint (every file checked against the manifest) into a scratch folder next
    to the output. A plain folder is a run's save dir (its newest complete tag, or --tag), or one
    tag folder itself; a tag is verified against its completeness marker first. A folder holding
    published tags (manifest.json + COMPLETE) is read like a bucket, so its manifest is checked too.
    """
    want = None if tag in (None, "latest") else tag
    if want is not None and not TAG_RE.match(want) and ("/" in want or want.startswith(".")):
        raise ConvertError(f"--tag {tag!r} is not a checkpoint tag (valid: latest or a folder name "
                           f"like global_step100)")
    if "://" in source:
        return _fetch_published(source, want, credentials=credentials,
                                scratch_parent=scratch_parent)

    path = Path(source).expanduser()
    if not path.exists():
        raise ConvertError(f"{source} does not exist (expected a checkpoint folder such as "
                           f"checkpoints/demo, or gs://bucket/prefix)")
    if not path.is_dir():
        raise ConvertError(f"{source} is a file, not a checkpoint folder (expected SAVE_DIR with "
                           f"global_stepN/ folders)")
    path = path.resolve()
    if _looks_like_tag_dir(path):
        if want is not None and want != path.name:
            raise ConvertError(f"{source} is the checkpoint {path.name} itself; --tag {tag} names "
                               f"another one (drop --tag, or give the save dir)")
        tag_dir = path
    else:
        tags = local_tags(path)
        pointer = path / "latest"
        if not tags and not pointer.is_file():
            raise ConvertError(
                f"{source} is not a DeepSpeed checkpoint folder: no 'latest' file, no "
                "global_stepN/ folders and no *model_states.pt (expected the save dir of a "
                "neox-train run, e.g. checkpoints/demo)"
            )
        if want is None and not _is_published(path):
            complete = commit.complete_tags(path)
            if not complete:
                torn = "; ".join(f"{s.tag}: {s.problem}" for s in commit.statuses(path)[-3:])
                raise ConvertError(f"{source} holds no complete checkpoint "
                                   f"({torn or 'no global_stepN folder'}); pass --tag to convert "
                                   "one as it is")
            want = complete[-1]
            named, why = commit.read_latest(path)
            if named != want:
                problem = commit.inspect(path, named).problem if named else why
                print(f"neox-convert-hf: {source}/latest "
                      f"{f'names {named}: ' if named else ''}{problem or 'is older'}; converting "
                      f"the newest complete checkpoint, {want}", file=sys.stderr)
        elif want is None:
            if not pointer.is_file():
                raise ConvertError(
                    f"{source} has no 'latest' file; pass --tag (available: {', '.join(tags)})")
            want = pointer.read_text().strip()
        tag_dir = path / want
        if not tag_dir.is_dir():
            raise ConvertError(
                f"checkpoint tag {want!r} not found in {source} (available: "
                f"{', '.join(tags) or 'none'})"
            )
    if _is_published(tag_dir.parent):
        # A published copy (e.g. the demo's local "bucket"): same rules as a bucket, COMPLETE +
        # manifest check, so a tag still uploading (files there, no COMPLETE yet) is refused rather
        # than converted half-written.
        return _fetch_published(str(tag_dir.parent), tag_dir.name, credentials=None,
                                scratch_parent=scratch_parent, shown_as=source)
    _check_intact(tag_dir)
    return Located(tag_dir=tag_dir, source=source)


def _fetch_published(url: str, tag: str | None, *, credentials: str | None, scratch_parent: Path,
                     shown_as: str | None = None) -> Located:
    backend = open_backend(url, credentials=credentials)
    if tag is None:
        tag = remote_latest(backend)
        if tag is None:
            raise ConvertError(f"{url}: no COMPLETE checkpoint there (a published checkpoint "
                               f"counts once its COMPLETE marker exists)")
    elif tag not in remote_checkpoints(backend):
        complete = remote_checkpoints(backend)
        raise ConvertError(
            f"{url}: checkpoint tag {tag!r} is not a COMPLETE published checkpoint "
            f"(complete: {', '.join(complete) or 'none'})"
        )
    scratch_parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".neox-convert-fetch-", dir=scratch_parent))
    print(f"neox-convert-hf: fetching {url}/{tag} (verified against its manifest)", file=sys.stderr)
    try:
        tag_dir = fetch_checkpoint(backend, tag, scratch, progress=sys.stderr.isatty())
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return Located(tag_dir=tag_dir, source=shown_as or url, remote=url,
                   cleanup=lambda: shutil.rmtree(scratch, ignore_errors=True))
