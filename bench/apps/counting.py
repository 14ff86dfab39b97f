"""Counts an app's calls, for the harness' check that every request wrk reports reached the app.

When BENCH_COUNT_DIR names a directory, `calls.slot[0] += 1` adds one to a counter of the
calling thread: 8 bytes (native unsigned) of a small file of its own in that directory, mapped
with mmap. Counting costs no system call per request (the file is made on a thread's first call)
and the count outlives the process, so a worker that exits still counts. A file per thread,
not per process, so that threads never race on one counter. `total(directory)` adds them up.

Without BENCH_COUNT_DIR, `calls` is None and the app counts nothing.
"""

from __future__ import annotations

import mmap
import os
import struct
import tempfile
import threading

ENV = "BENCH_COUNT_DIR"
_FORMAT = "Q"  # one native unsigned 64-bit counter per file
_SIZE = struct.calcsize(_FORMAT)


def _new_slot(directory: str) -> memoryview:
    fd, _ = tempfile.mkstemp(prefix=f"{os.getpid()}-", dir=directory)
    try:
        os.ftruncate(fd, _SIZE)
        mapped = mmap.mmap(fd, _SIZE)  # MAP_SHARED: the file sees every increment
    finally:
        os.close(fd)
    return memoryview(mapped).cast(_FORMAT)


class _Calls(threading.local):
    """`slot` is the calling thread's counter, made on its first use."""

    def __init__(self, directory: str) -> None:
        self._directory = directory

    def __getattr__(self, name: str) -> memoryview:
        # Called only while this thread has no `slot` yet.
        if name != "slot":
            raise AttributeError(name)
        self.slot = _new_slot(self._directory)
        return self.slot


def _counter() -> _Calls | None:
    directory = os.environ.get(ENV)
    if not directory:
        return None
    counter = _Calls(directory)
    # A child forked after the app was called must not add to its parent's counter (two
    # processes incrementing one mapping lose counts): it makes its own on its first call.
    os.register_at_fork(after_in_child=lambda: counter.__dict__.pop("slot", None))
    return counter


calls = _counter()


def total(directory: str | os.PathLike) -> int:
    """The sum of every counter in `directory` (what the app was called, all processes)."""
    count = 0
    for entry in os.scandir(directory):
        with open(entry.path, "rb") as f:
            raw = f.read(_SIZE)
        if len(raw) == _SIZE:
            count += struct.unpack(_FORMAT, raw)[0]
    return count
