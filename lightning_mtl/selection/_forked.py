"""Run a float-valued function over index ranges in this process and forked children, results in shared memory.

For ZIP-FIT's short texts the scoring itself takes well under a second, so a ``multiprocessing.Pool`` costs as
much as the work: it starts every worker from scratch, pickles every source to it and idles the calling
process. Here the children are forked (they inherit the texts, nothing is pickled), the calling process works
too, every process claims the next chunk of indices from one shared counter (so a process slowed by other
load simply takes fewer chunks), and each writes its values straight into one shared array.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable

import numpy as np

from lightning_mtl.selection._compress import keep_heap_mapped


def fork_available() -> bool:
    """Forking is used on Linux only (macOS's system libraries are not fork-safe)."""
    return sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods()


def forked_map(fn: Callable[[int, int], np.ndarray], count: int, processes: int, chunk: int) -> np.ndarray:
    """``fn(start, stop)`` over ``[0, count)`` in chunks, by this process and ``processes - 1`` forked ones.

    Args:
        fn: returns the ``stop - start`` float values of items ``start .. stop - 1``; it must not depend on
            which process calls it (the children run the parent's copy of it).
        count: number of items.
        processes: processes in all, this one included.
        chunk: items claimed at a time.

    Returns:
        The ``count`` values in item order.

    Raises:
        RuntimeError: a child process died before finishing its chunks.
    """
    context = multiprocessing.get_context("fork")
    values = context.RawArray("d", count)
    claimed = context.RawValue("q", 0)
    lock = context.Lock()

    def drain() -> None:
        out = np.frombuffer(values, dtype=np.float64)
        while True:
            with lock:
                start = claimed.value
                claimed.value = start + chunk
            if start >= count:
                return
            stop = min(start + chunk, count)
            out[start:stop] = fn(start, stop)

    def child() -> None:
        keep_heap_mapped()  # a process we own: keep deflate's buffers mapped between calls
        drain()

    children = [context.Process(target=child, daemon=True) for _ in range(processes - 1)]
    for process in children:
        process.start()
    try:
        drain()
    finally:
        for process in children:
            process.join()
    failed = [process.exitcode for process in children if process.exitcode != 0]
    if failed:
        raise RuntimeError(f"a scoring process (pid {os.getpid()}'s child) exited with code {failed[0]}")
    return np.frombuffer(values, dtype=np.float64).copy()
