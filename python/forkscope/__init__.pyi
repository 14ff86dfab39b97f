"""forkscope: the worker's view of the forkscope-server profiler (docs/PROFILER.md)."""

from typing import Optional

__version__: str

slot: Optional[int]
"""This worker's stable slot (0-based); None outside a worker (in the leader, at preload, or
in a process forkscope-server did not start). Set at fork: code that runs at import under
--preload should call worker_slot() instead."""

def worker_slot() -> Optional[int]:
    """This worker's slot, read at call time; None outside a worker."""

def is_tracing() -> bool:
    """True while a heap-profiling session runs in this worker; False outside a worker."""

def mark(label: str) -> Optional[str]:
    """While tracing: diff the heap against the baseline now and write a result labelled
    `label` (request id mark-LABEL-N); returns its path. Otherwise (and outside a worker)
    returns None at no cost. Never raises."""
