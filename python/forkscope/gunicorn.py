"""forkscope's profiler in gunicorn's workers: one line in gunicorn.conf.py (docs/GUNICORN.md).

    from forkscope.gunicorn import *

installs, in every worker once gunicorn has reset its signals (post_worker_init), the same
SIGUSR2 doorbell and command-file protocol as forkscope-server's workers, from the same
compiled code, writing {runtime_dir}/{pid}/ (FORKSCOPE_RUNTIME_DIR, default /run/forkscope),
so forkscope-sidecar profiles these workers like forkscope-server's. It also stops a session
still tracing when a worker exits (worker_exit), removes an exited worker's folder in the master
(child_exit) and, with --preload, calls gc.freeze() before the workers are forked (when_ready). A config that defines these hooks itself calls the
functions below from its own.
"""

import gc
import os
import signal

import forkscope
from forkscope import _native

__all__ = ["post_worker_init", "worker_exit", "child_exit", "when_ready"]


def runtime_dir():
    """The runtime directory shared with the sidecar."""
    return os.environ.get(_native.RUNTIME_DIR_ENV) or _native.DEFAULT_RUNTIME_DIR


def post_worker_init(worker):
    """Installs the profiler doorbell in this gunicorn worker.

    gunicorn has no stable worker slots: forkscope.slot is the worker's age minus one (0..N-1 for
    the first workers, the next number for each replacement).
    """
    previous = signal.getsignal(signal.SIGUSR2)
    app = worker.cfg.proc_name or ""
    try:
        folder = _native._install_in_gunicorn_worker(max(worker.age - 1, 0), app, runtime_dir())
    except OSError as e:
        worker.log.warning("forkscope: no profiler in this worker: %s", e)
        return
    if callable(previous) and previous is not getattr(forkscope, "_doorbell", None):
        worker.log.warning(
            "forkscope: the application's SIGUSR2 handler %r is replaced by the profiler "
            "doorbell (SIGUSR2 belongs to the profiler in workers; use another signal)",
            previous,
        )
    worker.log.info("forkscope: profiler doorbell installed (results in %s)", folder)


def worker_exit(server, worker):
    """A session still tracing when the worker exits hands in an `exit` result."""
    _native._worker_exiting("worker exiting")


def child_exit(server, worker):
    """In the master: removes the exited worker's folder from the runtime directory, unless it
    holds results the sidecar has yet to collect."""
    _native._worker_gone(runtime_dir(), worker.pid)


def when_ready(server):
    """With --preload: gc.freeze() before the workers are forked, so a full collection in a
    worker does not write to (and so copy) the pages it shares with the master."""
    if server.cfg.preload_app:
        gc.freeze()
