"""What the trainer knows about publishing: `PublishStatus`, kept from the upload process's messages
(or, inline, from the publications themselves) and read by retention, the loop's metrics and the
exit line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from neox_train.checkpoint.local.tags import sort_key, step_of_tag
from neox_train.log import log


@dataclass
class PublishStatus:
    pending: list[str] = field(default_factory=list)
    # verified remote: by this process or, found at start, earlier
    published: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    # given up for good in this process: tag -> why
    failed: dict[str, str] = field(default_factory=dict)
    # At exit on a node other than 0 (node-local storage): this node's part is remote, node 0
    # publishes the tag.
    handed: list[str] = field(default_factory=list)
    last_published_step: int = -1
    last_lag_s: float = float("nan")
    bytes_uploaded: int = 0
    files_uploaded: int = 0
    files_skipped: int = 0
    worker_retries: int = 0  # requests the worker's storage client retried (503s, resets, timeouts)
    failures: int = 0  # attempts that failed transiently and were retried
    # the last attempt failed (transiently): uploads are not getting through right now
    failing: bool = False
    worker_restarts: int = 0  # times the upload process died and was started again
    last_error: str = ""
    # tag -> {"upload_s": this node's files, "publish_s": manifest, COMPLETE, latest (or the wait
    # for the other nodes' parts)}, as the upload process timed them
    timings: dict[str, dict[str, float]] = field(default_factory=dict)

    def settle(self, tag: str) -> None:
        """The worker is done with `tag` (published, failed, skipped or handed): no longer
        pending."""
        if tag in self.pending:
            self.pending.remove(tag)

    def record_published(self, tag: str, *, lag_s: float, bytes_uploaded: int, files_uploaded: int,
                         files_skipped: int, timings: dict[str, float] | None = None) -> None:
        self.settle(tag)
        if timings:
            self.timings[tag] = timings
        self.failed.pop(tag, None)
        self.failing = False
        if tag not in self.published:
            self.published.append(tag)
        step = step_of_tag(tag)
        self.last_published_step = max(self.last_published_step, -1 if step is None else step)
        self.last_lag_s = lag_s
        self.bytes_uploaded += bytes_uploaded
        self.files_uploaded += files_uploaded
        self.files_skipped += files_skipped

    def record_failed(self, tag: str, error: str) -> None:
        self.settle(tag)
        self.failed[tag] = error
        self.last_error = error

    @property
    def unpublished(self) -> list[str]:
        """Checkpoints of this run kept locally because they are not published (yet, or for
        good)."""
        return sorted({*self.pending, *self.failed}, key=sort_key)

    @property
    def stuck(self) -> list[str]:
        """Checkpoints kept locally because publishing fails: those given up for good and, while
        every attempt fails, those waiting. (A backlog that is merely slow, a worker still starting,
        does not count.)"""
        return sorted({*self.failed, *(self.pending if self.failing else ())}, key=sort_key)

    def metrics(self, *, retries: int) -> dict[str, float]:
        return {
            "pending": float(len(self.pending)),
            "failed": float(len(self.failed)),
            "last_published_step": float(self.last_published_step),
            "lag_s": self.last_lag_s,
            "bytes_uploaded": float(self.bytes_uploaded),
            "retries": float(retries),
            "failures": float(self.failures),
            "worker_restarts": float(self.worker_restarts),
        }

    def apply(self, msg: dict[str, Any], url: str) -> None:
        """One message from the upload process (process.py), logged as the user reads it."""
        st = self
        kind = msg["kind"]
        st.worker_retries = max(st.worker_retries, int(msg.get("retries", 0)))
        if kind == "published":
            tag = msg["tag"]
            st.record_published(tag, lag_s=msg["lag_s"], bytes_uploaded=msg["bytes_uploaded"],
                                files_uploaded=msg["files_uploaded"],
                                files_skipped=msg["files_skipped"], timings=msg.get("timings"))
            log.info("sync: published %s to %s (%d files, %d bytes uploaded, lag %.1f s)", tag, url,
                     msg["files_uploaded"], msg["bytes_uploaded"], msg["lag_s"])
        elif kind == "verified":
            for tag in msg["tags"]:
                if tag not in st.published:
                    st.published.append(tag)
        elif kind == "handed":
            tag = msg["tag"]
            st.settle(tag)
            st.handed.append(tag)
            log.info("sync: %s: this node's part is uploaded to %s; node 0 publishes the "
                     "checkpoint (its log says whether it did)", tag, url)
        elif kind == "skipped":
            tag = msg["tag"]
            st.settle(tag)
            st.skipped.append(tag)
            log.warning("sync: skipped superseded checkpoint %s (backlog over max_pending); it "
                        "stays on local disk",
                        tag)
        elif kind == "failed":
            st.record_failed(msg["tag"], msg["error"])
            log.error("sync: cannot publish %s to %s, giving it up (it stays on local disk; %d "
                      "checkpoint(s) unpublished): %s", msg["tag"], url, len(st.unpublished),
                      msg["error"])
        elif kind == "failure":
            st.failures += 1
            st.failing = True
            st.last_error = msg["error"]
            log.warning("sync: %s failed (attempt %d, retrying in %.0f s): %s", msg["tag"],
                        msg["attempt"], msg["retry_in_s"], msg["error"])
        elif kind == "unreachable":
            # what waits is stuck now: max_unpublished_checkpoints applies as to any failure
            st.failing = True
            st.last_error = msg["error"]
            log.warning("sync: %s has not answered for %.0f s (every request fails: %s); %d "
                        "checkpoint(s) unpublished (%s), kept on local disk while uploads keep "
                        "retrying; training stops once more than max_unpublished_checkpoints are "
                        "stuck", msg["endpoint"], msg["seconds"], msg["error"],
                        len(st.unpublished), ", ".join(st.unpublished) or "none yet")
        elif kind == "warning":
            log.warning("sync: %s", msg["message"])
        elif kind == "reachable":
            st.failing = False
            log.info("sync: %s answers again; uploads continue", url)
        elif kind == "fatal":
            st.last_error = msg["error"]
            log.error("sync: worker cannot continue: %s", msg["error"])
