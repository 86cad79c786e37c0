"""The checkout itself: what git tracks and ignores (a fresh clone must hold every module, and the
README's outputs must never be committed by accident)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from conftest import REPO


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)


@pytest.fixture(scope="module")
def checkout():
    if (shutil.which("git") is None
            or _git("rev-parse", "--is-inside-work-tree").stdout.strip() != "true"):
        pytest.skip("not a git checkout")


def test_no_package_file_is_ignored(checkout):
    """.gitignore's `data/` once matched neox_train/data/ too: a new module there would never reach
    a clone."""
    files = [p.relative_to(REPO).as_posix() for p in (REPO / "neox_train").rglob("*.py")
             if "__pycache__" not in p.parts]
    ignored = _git("check-ignore", "--no-index", *files).stdout.split()
    assert ignored == []


@pytest.mark.parametrize("path", ["data/demo/shard_00000.npy", "checkpoints/demo/latest",
                                  "logs/demo/training.log", "bucket/demo/latest",
                                  "hf/demo/config.json", ".venv/bin/python",
                                  "neox_train/__pycache__/x.pyc"])
def test_what_the_readme_commands_write_is_ignored(checkout, path):
    assert _git("check-ignore", "--no-index", "-q", path).returncode == 0, f"{path} is not ignored"
