"""Writing a streamed merge: shard files appended on a thread, one batch behind the merge, and its progress bar.

Used by :mod:`bonesoup.merge.cpu_merge` (batches of raw output bytes, numpy, no torch).
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path

import numpy as np

from .safetensors_file import ShardWriter

__all__ = ["ShardStream", "Progress"]


class ShardStream:
    """Appends batches to their shard files on a thread, one batch behind the merge.

    At most two batches of output are alive: the one being written and the
    one being merged. The merging thread calls :meth:`reserve` before it
    allocates a batch's outputs; that waits until the writer has finished
    (and dropped) the batch before the previous one. A write error is raised
    in the merging thread at its next :meth:`reserve` / :meth:`put` or at :meth:`finish`.
    """

    #: Batches of output alive at once: one written while the next is merged.
    BATCHES_ALIVE = 2

    def __init__(self, tmp: Path, stats: dict, bar, *, fsync: bool = True):
        self._tmp, self._stats, self._bar, self._fsync = tmp, stats, bar, fsync
        self._queue: queue.Queue = queue.Queue()  # bounded by the slots, not by the queue
        self._slots = threading.Semaphore(self.BATCHES_ALIVE)
        self._error: BaseException | None = None
        self._writer: ShardWriter | None = None
        self._thread = threading.Thread(target=self._run, name="bonesoup-shard-writer", daemon=True)
        self._thread.start()

    def _write(self, batch, outs: list[np.ndarray]) -> None:
        """One batch into its shard (a function, so no reference to its arrays outlives the call)."""
        if self._writer is None or self._writer.layout is not batch.layout:
            if self._writer is not None:
                self._writer.close()
            self._writer = ShardWriter(self._tmp / batch.layout.name, batch.layout, fsync=self._fsync)
        for key, data in zip(batch.keys, outs):
            self._writer.write_bytes(key, data)
        written = sum(o.nbytes for o in outs)
        self._stats["bytes_written"] += written
        self._bar.update(written)

    def _run(self) -> None:
        try:
            while (item := self._queue.get()) is not None:
                self._write(*item)
                del item  # the batch's arrays are freed here, before its slot is given back
                self._slots.release()
            if self._writer is not None:
                self._writer.close()
        except BaseException as exc:  # handed to the merging thread
            self._error = exc
            if self._writer is not None:
                self._writer.abort()
            self._slots.release()  # wake a merging thread waiting in reserve(): it raises
            while self._queue.get() is not None:  # drain until finish() / abort()
                pass

    def reserve(self) -> None:
        """Wait until a batch's outputs may be allocated (fewer than BATCHES_ALIVE batches alive)."""
        self._slots.acquire()
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def put(self, batch, outs: list[np.ndarray]) -> None:
        self._raise()
        self._queue.put((batch, outs))

    def finish(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._raise()

    def abort(self) -> None:
        """Stop the thread after an error in the merging thread (no-op once finished)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._writer is not None:
            self._writer.abort()


class Progress:
    """A tqdm bar over output bytes, imported only when shown (tqdm costs start-up time)."""

    def __init__(self, total: int, n_inputs: int, enabled: bool):
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                             desc=f"merging {n_inputs} checkpoints")

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()
