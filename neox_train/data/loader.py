"""This rank's training micro-batches, assembled ahead of the loop.

A background thread takes the next window indices from the `SampleStream` and gathers their tokens
from the memory-mapped shards while the model computes, keeping up to `prefetch` micro-batches
ready. On CUDA it writes into a small pool of pinned host buffers, and `next()` copies each one to
the GPU with a non-blocking copy on a side stream: the compute stream waits for that copy only, and
since the host normally runs ahead of the GPU the transfer overlaps the previous micro-batch's
kernels. A pinned buffer is refilled only after its copy's event has completed.

Resume stays exact: `consumed_samples` is what the model has taken (it advances when `next()` hands
a batch over), never what the thread has prefetched. The thread owns the stream once started; the
loop reads positions from the loader only.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any

import torch

from neox_train.data.windows import PackedWindows, SampleStream

# How often a blocked thread or `next()` looks up to see whether the other side has gone away.
_POLL_S = 0.1


@dataclass(frozen=True)
class _Failed:
    error: BaseException


class MicroBatchLoader:
    def __init__(self, windows: PackedWindows, stream: SampleStream, *, device: torch.device,
                 prefetch: int):
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        self.windows = windows
        self.device = torch.device(device)
        self.prefetch = prefetch
        self._stream = stream
        self._consumed = stream.consumed_samples
        self._cuda = self.device.type == "cuda"
        self._thread: threading.Thread | None = None
        if prefetch == 0:
            return
        self._ready: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        if self._cuda:
            self._copy_stream = torch.cuda.Stream(self.device)
            # prefetch buffers can sit in the queue, one is being copied, one is being filled.
            self._free: queue.Queue = queue.Queue()
            shape = (stream.micro_batch, windows.seq_len + 1)
            for _ in range(prefetch + 2):
                self._free.put((torch.empty(shape, dtype=torch.int64, pin_memory=True), None))
        self._thread = threading.Thread(target=self._produce, name="neox-loader", daemon=True)
        self._thread.start()

    @property
    def consumed_samples(self) -> int:
        """Samples (all ranks together) in the micro-batches handed to the model so far: the resume
        position."""
        return self._consumed

    # -- the loop's side ---------------------------------------------------------------------------
    def next(self) -> torch.Tensor:
        """The next micro-batch, (micro_batch, seq_len + 1) int64 on the device."""
        if self._thread is None:
            host = torch.from_numpy(self.windows.batch(self._stream.next_micro_batch()))
            self._consumed = self._stream.consumed_samples
            if self._cuda:
                # A copy from pageable memory would wait for the GPU's queued work and count it as
                # data wait; from pinned memory it is queued like a kernel (torch's pinned-memory
                # cache keeps the buffer alive until the copy has run).
                return host.pin_memory().to(self.device, non_blocking=True)
            return host.to(self.device)
        item = self._take()
        host, consumed = item
        self._consumed = consumed
        if not self._cuda:
            return host.to(self.device)  # CPU: the very tensor, no copy
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._copy_stream):
            batch = host.to(self.device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self._copy_stream)
        compute.wait_event(copied)
        # Allocated on the copy stream, used on the compute stream: tell the caching allocator, or
        # it could hand the memory back to the copy stream while compute still reads it.
        batch.record_stream(compute)
        self._free.put((host, copied))
        return batch

    def _take(self) -> tuple[torch.Tensor, int]:
        while True:
            try:
                item = self._ready.get(timeout=_POLL_S)
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError("the data loader thread stopped") from None
                continue
            if isinstance(item, _Failed):
                raise item.error
            return item

    def close(self) -> None:
        """Stop the thread (prefetched batches are dropped: they were never consumed)."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join(timeout=10)
        self._thread = None

    # -- the thread's side -------------------------------------------------------------------------
    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                indices = self._stream.next_micro_batch()
                consumed = self._stream.consumed_samples
                if self._cuda:
                    slot = self._get_or_stop(self._free)
                    if slot is None:
                        return
                    host, copied = slot
                    if copied is not None:
                        copied.synchronize()  # its last copy to the GPU has finished reading it
                    self.windows.batch(indices, out=host.numpy())
                else:
                    host = torch.from_numpy(self.windows.batch(indices))
                if not self._put_or_stop((host, consumed)):
                    return
        # handed to the loop, which raises it where the batch was wanted
        except BaseException as err:
            self._put_or_stop(_Failed(err))

    def _get_or_stop(self, q: queue.Queue) -> Any:
        while not self._stop.is_set():
            try:
                return q.get(timeout=_POLL_S)
            except queue.Empty:
                continue
        return None

    def _put_or_stop(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False
