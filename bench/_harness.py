"""What the performance benchmarks share: synthetic token shards, a real `Trainer` built in this
process the way `neox-train` builds it, device synchronisation, and the one-JSON-line output.

The benchmarks drive the package's own Trainer, loader and accounting (no re-implementation), in one
process, so variants can be interleaved (A B B A ...) and every comparison is a ratio measured under
the same load.
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# stdout carries the one JSON line and nothing else. DeepSpeed's logger writes to whatever
# sys.stdout is when deepspeed is first imported, so stdout is pointed at stderr before that import
# and kept here for emit().
_RESULT_OUT = sys.stdout
sys.stdout = sys.stderr

import numpy as np  # noqa: E402


def synthetic_shards(folder: Path, *, vocab_size: int, num_tokens: int, shards: int = 4,
                     seed: int = 0) -> Path:
    """Uniform random token ids in `shards` .npy files plus meta.json (what `neox-data prepare`
    would write). Throughput does not depend on what the tokens say; the loader's work (memmap
    gather) is the same."""
    folder.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if vocab_size <= 2**16 else np.uint32
    rng = np.random.default_rng(seed)
    per = -(-num_tokens // shards)
    for i in range(shards):
        np.save(folder / f"shard_{i:03d}.npy", rng.integers(0, vocab_size, size=per, dtype=dtype))
    (folder / "meta.json").write_text(json.dumps({"vocab_size": vocab_size, "eos_token_id": 0}))
    return folder


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings -> run-config overrides; VALUE is JSON when it parses (true, 3, null),
    else a string."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"bench: expected KEY=VALUE, got {item!r}")
        out[key.strip()] = _value(raw)
    return out


def _value(raw: str) -> Any:
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def parse_compare(spec: str) -> tuple[str, list[Any]]:
    """`KEY=V1,V2,...` -> (key, [values])."""
    key, sep, raw = spec.partition("=")
    values = [_value(v) for v in raw.split(",") if v]
    if not sep or not key or len(values) < 2:
        raise SystemExit(f"bench: --compare expects KEY=V1,V2[,...], got {spec!r}")
    return key, values


def build_session(values: dict[str, Any]):
    """A training session for these run-config values, started as `neox-train` starts one
    (train.session: the same checks, engine, lock and publisher). Stop it with `session.close()`."""
    from neox_train.config import from_dict
    from neox_train.train.session import start_session

    return start_session(from_dict(values, source="bench"))


def sync() -> None:
    """Wait for queued device work, so a wall-clock reading covers it (no-op on CPU)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_block(fn) -> float:
    sync()
    started = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - started


def abba(rounds: int, names: list[str]) -> list[list[str]]:
    """Run orders A B ... then ... B A, alternating, so slow drift of the machine's load cancels
    out."""
    return [names if r % 2 == 0 else names[::-1] for r in range(rounds)]


def read_train_records(log_dir: Path) -> list[dict[str, Any]]:
    path = log_dir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return [r for r in records if r["kind"] == "train"]


def median(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def device_info() -> dict[str, Any]:
    import torch

    if torch.cuda.is_available():
        return {"device": torch.cuda.get_device_name(0), "cuda": torch.version.cuda}
    return {"device": "cpu", "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}


def run_in_scratch(name: str, measure: Callable[[Path], dict[str, Any]]) -> int:
    """A bench's main: measure(scratch folder) in a temporary folder removed afterwards, its result
    emitted as bench NAME; the exit status."""
    with tempfile.TemporaryDirectory(prefix=f"neox-{name}-") as tmp:
        result = measure(Path(tmp))
    emit({"bench": name, **result})
    return 0


def emit(result: dict[str, Any]) -> None:
    """One JSON line on stdout (everything else goes to stderr), with the date and the command that
    made it."""
    # it changes CPU timings
    env = [f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS",) if k in os.environ]
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join([*env,
                             *(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv])]),
        **device_info(),
        **result,
    }
    _RESULT_OUT.write(json.dumps(result) + "\n")
    _RESULT_OUT.flush()


def add_demo_shape_arguments(p) -> None:
    """The model shape the CPU benches default to: the README demo's (neox-demo, seq 128, 8 x 2,
    fp32, vocab 4096)."""
    from neox_train.model import MODEL_PRESETS

    p.add_argument("--preset", default="neox-demo", choices=sorted(MODEL_PRESETS))
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--precision", choices=("bf16", "no"), default="no")
    p.add_argument("--vocab-size", type=int, default=4096)
