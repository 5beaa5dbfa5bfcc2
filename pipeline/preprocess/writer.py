"""Files of a case written on background threads while the next output is computed."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.io_utils import save_npy

__all__ = ["BackgroundWriter", "WRITER_THREADS"]

WRITER_THREADS = int(os.environ.get("CTVQ_WRITER_THREADS", "2"))  # background file writers per worker


class BackgroundWriter:
    """Saves arrays with :func:`save_npy` on background threads (``CTVQ_WRITER_THREADS``, 2).

    ``save`` returns at once; ``wait_for(owner)`` blocks until the last file written from
    ``owner``'s memory is done (before that buffer is refilled); ``wait_all`` re-raises the
    first write error. Time spent blocked is added to the timer's "write" stage, the writer
    thread's own time to "write_bg".
    """

    def __init__(self, timer):
        self.timer = timer
        self.pool = ThreadPoolExecutor(max_workers=WRITER_THREADS, thread_name_prefix="ctvq-writer")
        self.futures: list = []
        self.by_owner: dict[int, Any] = {}
        self.lock = threading.Lock()

    def _save(self, path: Path, array: np.ndarray, saver) -> None:
        t0 = time.perf_counter()
        saver(path, array)
        with self.lock:
            self.timer.t["write_bg"] = self.timer.t.get("write_bg", 0.0) + time.perf_counter() - t0

    def save(self, path: Path, array: np.ndarray, owner: Any = None, saver=save_npy) -> None:
        fut = self.pool.submit(self._save, Path(path), array, saver)
        self.futures.append(fut)
        if owner is not None:
            self.by_owner[id(owner)] = fut

    def wait_for(self, owner: Any) -> None:
        fut = self.by_owner.pop(id(owner), None)
        if fut is not None:
            with self.timer("write"):
                fut.result()

    def wait_all(self) -> None:
        with self.timer("write"):
            for fut in self.futures:
                fut.result()

    def close(self) -> None:
        self.pool.shutdown(wait=True)  # never leave a thread writing into a folder being removed
