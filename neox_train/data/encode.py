"""Tokenization for `neox-data prepare`: batches of documents in, token arrays out, in input order.

With one worker the tokenizer runs here (its Rust side already spreads a batch over the cores). With
N workers, N spawned processes each encode whole batches on one thread, so reading and parsing the
input here overlaps with the encoding there. At most 2N batches are in flight, so memory stays
bounded however large the corpus is. The output does not depend on N: each document is encoded
alone, and results come back in the order the batches went out.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

_worker: dict = {}


def _init(tokenizer_path: str, eos_id: int) -> None:
    os.environ["RAYON_NUM_THREADS"] = "1"  # one thread per worker process: N workers, N cores
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker["tokenizer"] = Tokenizer.from_file(tokenizer_path)
    _worker["eos"] = eos_id


def encode_batch(tokenizer: Tokenizer, eos_id: int,
                 docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(tokens of every document, each followed by the end-of-text id, as one int32 array; each
    document's length including it)."""
    encodings = tokenizer.encode_batch(docs, add_special_tokens=False)
    lengths = np.fromiter((len(e.ids) + 1 for e in encodings), dtype=np.int64, count=len(encodings))
    flat = np.empty(int(lengths.sum()), dtype=np.int32)
    at = 0
    for enc, n in zip(encodings, lengths.tolist()):
        flat[at:at + n - 1] = enc.ids
        flat[at + n - 1] = eos_id
        at += n
    return flat, lengths


def _encode(docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return encode_batch(_worker["tokenizer"], _worker["eos"], docs)


class Encoder:
    def __init__(self, tokenizer_path: Path, eos_id: int, workers: int):
        self.workers = max(1, workers)
        self._pool = None
        if self.workers == 1:
            self._tokenizer = Tokenizer.from_file(str(tokenizer_path))
            self._eos = eos_id
        else:
            self._pool = mp.get_context("spawn").Pool(self.workers, initializer=_init,
                                                      initargs=(str(tokenizer_path), eos_id))

    def map(self, batches: Iterable[list[str]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(tokens, lengths) for every batch, in order."""
        if self._pool is None:
            for docs in batches:
                yield encode_batch(self._tokenizer, self._eos, docs)
            return
        pending: deque = deque()
        for docs in batches:
            pending.append(self._pool.apply_async(_encode, (docs,)))
            if len(pending) >= 2 * self.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.terminate()
            self._pool.join()
            self._pool = None
