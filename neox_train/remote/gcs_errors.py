"""Failures of the gs:// backend: the retry policy, what it retried, and the google-cloud-storage
client's many exception types as one-line StorageErrors, transient (worth retrying: the network, a
5xx, a timeout) or permanent (no permission, no bucket, bad credentials): the one place that knows
which is which."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import requests
from google.api_core import exceptions as api
from google.api_core.retry import Retry
from google.auth import exceptions as auth
from google.cloud.storage.exceptions import DataCorruption, InvalidResponse
from google.cloud.storage.retry import DEFAULT_RETRY

from neox_train.errors import StorageError, one_line
from neox_train.remote.base import note_retry


@contextmanager
def mapped_errors(action: str, where: str, *, host: str, bucket: str, deadline_s: float,
                  missing: str = "bucket") -> Iterator[None]:
    """Map the client's exceptions raised inside to one-line StorageErrors about `action` on
    `where`. `missing`: what a 404 means for this call ("bucket" or "object"); `deadline_s`: how
    long the retry policy tried, for the message."""
    try:
        yield
    except (StorageError, api.PreconditionFailed):
        raise  # 412 is an answer for the caller of a conditional write, not an error
    except api.RetryError as e:
        cause = e.cause if e.cause is not None else e
        seconds = f"{deadline_s:.0f} s"
        if isinstance(cause, (requests.ConnectionError, requests.Timeout, ConnectionError)):
            raise StorageError(
                f"cannot reach {host} to {action} {where} (gave up after {seconds}): "
                f"{one_line(cause)}",
                transient=True) from e
        raise StorageError(
            f"cannot {action} {where}: still failing after retrying for {seconds}: "
            f"{one_line(cause)}",
            transient=True) from e
    except api.NotFound as e:
        if missing == "bucket":
            raise StorageError(
                f"cannot {action} {where}: bucket {bucket} does not exist (create "
                "it, or fix the URL)"
            ) from e
        raise StorageError(f"cannot {action} {where}: the object does not exist") from e
    except api.Forbidden as e:
        raise StorageError(
            f"no permission to {action} {where} ({' '.join(str(e.message).split())}): the "
            f"credentials need e.g. roles/storage.objectAdmin on bucket {bucket}"
        ) from e
    except (api.Unauthorized, auth.RefreshError, auth.DefaultCredentialsError) as e:
        raise StorageError(
            f"credentials rejected while trying to {action} {where}: {one_line(e)}") from e
    except DataCorruption as e:
        raise StorageError(f"checksum mismatch while trying to {action} {where}: {one_line(e)}",
                           transient=True) from e
    except (requests.ConnectionError, requests.Timeout, ConnectionError,
            auth.TransportError) as e:
        raise StorageError(f"cannot reach {host} to {action} {where}: {one_line(e)}",
                           transient=True) from e
    except api.GoogleAPICallError as e:
        code = int(e.code or 0)
        raise StorageError(f"cannot {action} {where}: HTTP {e.code} "
                           f"{' '.join(str(e.message).split())}",
                           transient=code >= 500 or code in (408, 429)) from e
    except InvalidResponse as e:
        raise StorageError(f"cannot {action} {where}: {one_line(e)}", transient=True) from e


def is_refusal(error: BaseException) -> bool:
    """A StorageError made of a 403: the credentials, a bucket policy or an object's hold forbid
    what was tried (retrying cannot help; another way of writing may)."""
    return isinstance(error.__cause__, api.Forbidden)


def retry_policy(deadline_s: float, *, initial_s: float, maximum_s: float,
                 on_error: Callable[[BaseException], None]) -> Retry:
    """DEFAULT_RETRY's predicate (429, 5xx, resets, timeouts) with exponential backoff from
    initial_s to maximum_s, until deadline_s; on_error sees each retried failure."""
    return Retry(predicate=DEFAULT_RETRY._predicate, initial=initial_s, maximum=maximum_s,
                 multiplier=2.0, timeout=deadline_s, on_error=on_error)


class Failures:
    """What one backend's retry policy retried: how many requests, and since when requests have
    failed with none getting through (the upload process warns from it when an endpoint is down,
    long before a retry deadline ends). Thread-safe."""

    def __init__(self):
        self.count = 0
        self._since: float | None = None  # monotonic time of the first failure since a success
        self._last = ""
        self._lock = threading.Lock()

    def retried(self, error: BaseException) -> None:
        with self._lock:
            self.count += 1
            if self._since is None:
                self._since = time.monotonic()
            self._last = one_line(error)
        note_retry()

    def got_through(self) -> None:
        with self._lock:
            self._since = None

    def failing_for(self) -> tuple[float, str]:
        """(seconds since requests began failing with no success since, the last failure); (0, "")
        while they get through."""
        with self._lock:
            since, last = self._since, self._last
        return (0.0, "") if since is None else (time.monotonic() - since, last)
