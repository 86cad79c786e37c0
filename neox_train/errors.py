"""One error model for every command: what went wrong, in one line, and the exit status it means.

Everything neox-train raises on purpose derives from NeoxError: str(err) is one line naming the
file, field, URL or value, what is wrong and what would be valid. `run_guarded` turns it into
`PROG: error: LINE` on stderr and the error's exit status (2 for bad input and environments, 1 for a
run that did not reach its goal), in every console script alike. Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


class NeoxError(Exception):
    """The base: one line, exit status 2."""

    exit_code = 2
    label = "error"


class ConfigError(NeoxError, ValueError):
    """A bad run or DeepSpeed config (or flag). str(err) names every bad field and what is valid."""


class MissingExtra(ConfigError):
    """An optional package (a tracker's, lm-eval) is not installed: the line names the extra."""


class DataError(NeoxError, ValueError):
    """Bad or missing token shards, corpora or tokenizers."""


class StorageError(NeoxError, RuntimeError):
    """A storage problem: the URL/object/file, what is wrong and what would be valid.

    `transient`: a later attempt may succeed (the network, a 5xx, an object that changed underneath
    us); the upload worker retries those with backoff. Everything else is permanent (no permission,
    no bucket, a published checkpoint in the way): retrying cannot help, so the worker gives the
    checkpoint up and moves on."""

    def __init__(self, message: str, *, transient: bool = False):
        super().__init__(message)
        self.transient = transient


class CheckpointError(NeoxError):
    """A checkpoint that cannot be saved or used here (full disk, damaged tag): the folder, what
    happened, and what is still safe."""


class ConvertError(NeoxError, ValueError):
    """Bad conversion input."""


class VerifyFailed(NeoxError):
    """An export's logits differ from the checkpoint's: nothing was installed at --out."""

    exit_code = 1
    label = "verify failed"


class UnpublishedCheckpoints(NeoxError):
    """Training finished (or stopped) but some checkpoints never reached the bucket: the run must
    not look green."""

    exit_code = 1


class RunDiverged(NeoxError):
    """The loss guard's streaks of bad steps outlasted its rollbacks (or there was no checkpoint to
    go back to): a restart would diverge the same way."""

    exit_code = 1
    label = "diverged"


def one_line(err: BaseException) -> str:
    """`Type: message` on one line (for errors of other libraries quoted inside ours)."""
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def read_json_object(path: Path, *, what: str, error: type[NeoxError] = ConfigError,
                     missing_ok: bool = False) -> dict[str, Any] | None:
    """The JSON object in `path`, or `error` with one line naming the file and what it should hold.
    None when the file does not exist and `missing_ok`."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if missing_ok:
            return None
        raise error(f"{path} does not exist (expected {what})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{path} cannot be read ({one_line(e)}; expected {what})") from None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise error(f"{path} is not valid JSON ({one_line(e)}; expected {what})") from None
    if not isinstance(data, dict):
        raise error(f"{path} must hold a JSON object ({what}), got {type(data).__name__}")
    return data


def run_guarded(prog: str, fn: Callable[[], int]) -> int:
    """Run a command's body: a NeoxError becomes `PROG: error: <one line>` on stderr and its exit
    status."""
    try:
        return fn()
    except NeoxError as e:
        print(f"{prog}: {e.label}: {e}", file=sys.stderr)
        return e.exit_code


def is_transient(err: BaseException) -> bool:
    """Worth retrying: a StorageError marked transient. Everything else (no permission, a conflict,
    a bug) would fail the same way again."""

    return isinstance(err, StorageError) and err.transient
