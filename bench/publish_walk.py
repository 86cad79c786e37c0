"""The walk of one checkpoint from the trainer's hand-off to the bucket, as a reader follows it:
which files of the package control passes through, in order, and how often it comes back to a file
it had left.

    python bench/publish_walk.py

Runs the real code in one process: `Publisher.committed(tag)` (the trainer's side: journal,
hand-off), then the upload process's own loop (`run_upload_process`, called here instead of in a
spawned child so one profiler sees it) publishing the tag to a folder "bucket" until it is COMPLETE.
Prints one JSON line: the files in first-visit order, `stays` (maximal stretches in one file),
`returns` (stays in a file already left, by a call or a return) and `reentries` (calls into a file
already left that is not the caller: the walk climbing back up).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PACKAGE = str(REPO / "neox_train") + os.sep


def _short(filename: str) -> str | None:
    return filename[len(PACKAGE):] if filename.startswith(PACKAGE) else None


class Walk:
    """sys.setprofile hook: the sequence of package files control is in (Python calls and returns
    only)."""

    def __init__(self) -> None:
        self.stays: list[str] = []
        self.reentries = 0
        # "caller -> callee" where the callee's file is further up the stack
        self.callbacks: dict[str, int] = {}

    def _enter(self, name: str | None, *, by_call: bool, caller: str | None) -> None:
        if name is None or (self.stays and self.stays[-1] == name):
            return
        if by_call and name in self.stays and name != caller:
            self.reentries += 1
        self.stays.append(name)

    def __call__(self, frame, event, _arg) -> None:
        if event == "call":
            caller = _short(frame.f_back.f_code.co_filename) if frame.f_back else None
            callee, up = _short(frame.f_code.co_filename), frame.f_back
            while callee and caller and up is not None:
                up = up.f_back
                if up is not None and _short(up.f_code.co_filename) == callee != caller:
                    key = f"{caller} -> {callee}"
                    self.callbacks[key] = self.callbacks.get(key, 0) + 1
                    break
            self._enter(_short(frame.f_code.co_filename), by_call=True, caller=caller)
        elif event == "return" and frame.f_back is not None:
            self._enter(_short(frame.f_back.f_code.co_filename), by_call=False, caller=None)

    def summary(self) -> dict:
        files = list(dict.fromkeys(self.stays))
        return {"files": files, "n_files": len(files), "stays": len(self.stays),
                "returns": len(self.stays) - len(files), "reentries": self.reentries,
                "callbacks": self.callbacks}


def main() -> None:
    from neox_train.checkpoint.local import commit
    from neox_train.checkpoint.publish.owner import Identity, claim
    from neox_train.checkpoint.publish.process import STOP, run_upload_process
    from neox_train.checkpoint.publish.publisher import Publisher
    from neox_train.checkpoint.publish.settings import PublishSettings
    from neox_train.remote import open_backend

    with tempfile.TemporaryDirectory() as tmp:
        save_dir, bucket = Path(tmp) / "ckpt", Path(tmp) / "bucket"
        identity = Identity("00000000abcd", "000000000001")
        tag = "global_step1"
        (save_dir / tag).mkdir(parents=True)
        (save_dir / tag / "mp_rank_00_model_states.pt").write_bytes(os.urandom(1 << 16))
        commit.commit(save_dir, tag, run_id=identity.run_id)
        claim(open_backend(str(bucket)), identity, takeover=False, save_dir=str(save_dir))
        settings = PublishSettings(url=str(bucket), save_dir=str(save_dir), run_id=identity.run_id,
                                   session=identity.session, yield_to_save_max_s=0.0)
        publisher = Publisher(settings)  # its upload process is never started: the loop runs below
        task_recv, tasks = mp.Pipe(duplex=False)
        status_recv, status_send = mp.Pipe(duplex=False)
        publisher._tasks = tasks  # noqa: SLF001 - the pipe the started process would read
        walk = Walk()
        sys.setprofile(walk)
        try:
            publisher.committed(tag)
            tasks.send(STOP)
            run_upload_process(settings, task_recv, status_send, None, os.getppid())
        finally:
            sys.setprofile(None)
        messages = []
        while status_recv.poll(0):
            messages.append(status_recv.recv()["kind"])
        assert "published" in messages, messages
        assert (bucket / tag / "COMPLETE").is_file()
        print(json.dumps({"bench": "publish_walk", **walk.summary()}))
        if os.environ.get("WALK_SEQ"):
            print(" -> ".join(walk.stays))


if __name__ == "__main__":
    main()
