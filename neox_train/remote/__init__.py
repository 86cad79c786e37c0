"""Where checkpoints and data live remotely: storage backends (gs://, folders) and rsync between
them."""

from __future__ import annotations

from pathlib import Path

from neox_train.config import DEFAULT_TRANSFER_STREAMS
from neox_train.remote.base import Backend, parse_url
from neox_train.remote.local import LocalBackend


def open_backend(url: str, *, credentials: str | None = None, start_up: bool = False,
                 streams: int = DEFAULT_TRANSFER_STREAMS, parallel_uploads: bool = True,
                 parts_journal: Path | None = None) -> Backend:
    """The backend for `url`. For gs:// this creates the client (credentials are checked now, the
    network is not touched: call probe() for that). `start_up`: for the checks before training
    starts, which give up after PROBE_DEADLINE_S instead of retrying for RETRY_DEADLINE_S (a bucket
    that cannot answer now fails the start in seconds, with one line). `streams`: the stream budget
    (RunConfig.transfer_streams); `parallel_uploads`: large files in parts (composite.py), recorded
    in `parts_journal` (default: the user's, composite.default_journal_path)."""
    kind, where, prefix = parse_url(url)
    if kind == "gs":
        # Deferred: google-cloud-storage and requests (~0.2 s) load only for a gs:// URL; folder and
        # rsync commands never pay for them.
        from neox_train.remote.gcs import PROBE_DEADLINE_S, GcsBackend

        backend = GcsBackend(where, prefix, credentials=credentials, streams=streams,
                             parallel=parallel_uploads, parts_journal=parts_journal)
        if start_up:
            backend.configure_retry(deadline_s=PROBE_DEADLINE_S)
        return backend
    return LocalBackend(Path(where))
