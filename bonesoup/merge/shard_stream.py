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

    The queue holds one batch, so at most two batches of output are alive (the
    one being written, the one just merged). A write error is raised in the
    merging thread at its next :meth:`put` or at :meth:`finish`.
    """

    def __init__(self, tmp: Path, stats: dict, bar):
        self._tmp, self._stats, self._bar = tmp, stats, bar
        self._queue: queue.Queue = queue.Queue(maxsize=1)
        self._error: BaseException | None = None
        self._writer: ShardWriter | None = None
        self._thread = threading.Thread(target=self._run, name="bonesoup-shard-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while (item := self._queue.get()) is not None:
                batch, outs = item
                if self._writer is None or self._writer.layout is not batch.layout:
                    if self._writer is not None:
                        self._writer.close()
                    self._writer = ShardWriter(self._tmp / batch.layout.name, batch.layout)
                for key, data in zip(batch.keys, outs):
                    self._writer.write_bytes(key, data)
                written = sum(o.nbytes for o in outs)
                self._stats["bytes_written"] += written
                self._bar.update(written)
                del item, outs
            if self._writer is not None:
                self._writer.close()
        except BaseException as exc:  # handed to the merging thread
            self._error = exc
            if self._writer is not None:
                self._writer.abort()
            while self._queue.get() is not None:  # drain, so put() never blocks on a dead writer
                pass

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
