"""`neox-sync SRC DST` and `neox-data download URL DIR`: parse, run package code, one summary,
one-line errors."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from neox_train.checkpoint.local.lock import lock_save_dir
from neox_train.checkpoint.publish.backlog import publish_checkpoints
from neox_train.checkpoint.publish.copy_rules import check_plain_copy, protect_published
from neox_train.checkpoint.publish.journal import journal_path
from neox_train.checkpoint.publish.owner import owner_at_or_above
from neox_train.config import DEFAULT_TRANSFER_STREAMS, MAX_TRANSFER_STREAMS
from neox_train.errors import run_guarded
from neox_train.remote import open_backend
from neox_train.remote.rsync import SyncResult, sync, sync_down


def _streams_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_TRANSFER_STREAMS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a stream count (valid: an integer from 1 to {MAX_TRANSFER_STREAMS})")
    return value


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


def _summary(result: SyncResult) -> str:
    parts = []
    if result.files_uploaded or not result.files_downloaded:
        parts.append(f"{result.files_uploaded} uploaded ({_mb(result.bytes_uploaded)})")
    if result.files_downloaded:
        parts.append(f"{result.files_downloaded} downloaded ({_mb(result.bytes_downloaded)})")
    parts.append(f"{result.files_skipped} unchanged")
    if result.retries:
        parts.append(f"{result.retries} retried request(s)")
    return ", ".join(parts) + f" in {result.seconds:.1f}s"


def _report(prog: str, result: SyncResult, as_json: bool) -> int:
    print(f"{prog}: {_summary(result)}", file=sys.stderr)
    if as_json:
        print(json.dumps(result.to_dict()))
    return 0


def sync_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="neox-sync",
        description="Copy between a local folder and gs://bucket/prefix (or another folder), "
                    "either direction, gsutil-rsync style: unchanged files (same size and crc32c) "
                    "are skipped, nothing is deleted, uploads are verified by listing.",
    )
    p.add_argument("src", metavar="SRC", help="local folder, file:///path or gs://bucket/prefix")
    p.add_argument("dst", metavar="DST", help="local folder, file:///path or gs://bucket/prefix")
    p.add_argument("--checkpoints", action="store_true",
                   help="SRC is a checkpoint save dir: publish each global_step* folder (files, "
                        "manifest, COMPLETE, latest) instead of copying files; finishes uploads a "
                        "training run left unpublished")
    _add_transfer_options(p, "transfers")
    return p


def _add_transfer_options(parser: argparse.ArgumentParser, what: str) -> None:
    """--credentials, --streams, --json: the same for neox-sync and neox-data download."""
    parser.add_argument("--credentials", metavar="FILE",
                        help="service-account JSON key for gs:// (default: "
                             "GOOGLE_APPLICATION_CREDENTIALS, then gcloud's application-default "
                             "login)")
    parser.add_argument("--streams", "--workers", dest="streams", type=_streams_arg,
                        default=DEFAULT_TRANSFER_STREAMS, metavar="N",
                        help=f"concurrent streams for the {what}, across files and the parts of "
                             f"large files (default {DEFAULT_TRANSFER_STREAMS}; --workers is the "
                             "old name)")
    parser.add_argument("--no-parallel-uploads", dest="parallel_uploads", action="store_false",
                        help="send every file to gs:// in one stream (no parts composed in the "
                             "bucket: e.g. with soft delete on, see docs/checkpoints.md)")
    parser.add_argument("--json", action="store_true",
                        help="print the summary as one JSON object on stdout")


def main(argv: list[str] | None = None) -> int:
    args = sync_parser().parse_args(argv)
    return run_guarded("neox-sync", lambda: _sync(args))


def _sync(args: argparse.Namespace) -> int:
    progress = sys.stderr.isatty()
    if args.checkpoints:
        # The run training in SAVE_DIR publishes its own checkpoints: a second publisher is refused.
        lock = lock_save_dir(args.src, why="that process (its training run, or another neox-sync "
                                           "--checkpoints) publishes these checkpoints itself; run "
                                           "this once it has stopped", wait_s=0,
                             read_only_ok=True) \
            if Path(args.src).is_dir() else None
        try:
            backend = open_backend(args.dst, credentials=args.credentials, streams=args.streams,
                                   parallel_uploads=args.parallel_uploads,
                                   parts_journal=journal_path(Path(args.src), 0))
            result = publish_checkpoints(Path(args.src), backend, workers=args.streams,
                                         progress=progress)
        finally:
            if lock is not None:
                lock.release()
    else:
        def check(src_dir: Path, backend) -> None:
            # An upload: nothing shaped like a checkpoint, nothing into a run's prefix, refused
            # before any byte.
            check_plain_copy(src_dir, backend,
                             owner_at_or_above(args.dst, credentials=args.credentials))

        # A plain copy never writes into a published checkpoint (those change only by publication).
        result = sync(args.src, args.dst, credentials=args.credentials, workers=args.streams,
                      parallel_uploads=args.parallel_uploads, progress=progress,
                      guard=protect_published, check=check)
    code = _report("neox-sync", result, args.json)
    left = [why for why in result.not_published.values()
            if not why.startswith("not complete locally")]
    for tag, why in result.not_published.items():
        print(f"neox-sync: not published {tag}: {why}", file=sys.stderr)
    # Torn tags (a save that never finished) are left alone by design; a complete one that could not
    # be published must not look like success.
    return 1 if left else code


def add_download_arguments(parser: argparse.ArgumentParser) -> None:
    """The `neox-data download` options, kept next to the code they drive."""
    parser.add_argument("url", metavar="URL",
                        help="gs://bucket/prefix (or a folder) holding token shards")
    parser.add_argument("dir", metavar="DIR", help="local folder; nested folders are preserved")
    _add_transfer_options(parser, "downloads")


def main_download(args: argparse.Namespace) -> int:
    """Bucket -> DIR; files already there with the remote size are skipped, so a rerun resumes."""

    def go() -> int:
        result = sync_down(open_backend(args.url, credentials=args.credentials,
                                        streams=args.streams), "", Path(args.dir),
                           workers=args.streams, skip_existing=True, verify=True,
                           progress=sys.stderr.isatty())
        return _report("neox-data download", result, args.json)

    return run_guarded("neox-data", go)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
