"""A WSGI app that leaks on purpose, for the profiler tests (tests/profiler.rs).

Every call of leak() keeps one LEAK_SIZE-byte bytearray alive for the life of the worker; the
allocation is on the line marked "# LEAK", which the tests look up (never hard-code) and expect
at the top of the heap diff.

Routes:
  /leak?n=N                  leak N objects (default 1), answer the number kept so far
  /block?dir=D&n=N           a long request: write D/entered, wait for D/go1, leak N objects,
                             write D/leaked, wait for D/go2, answer (polls with time.sleep, which
                             signals interrupt: the doorbell is answered inside the request)
  /slot                      JSON: slot at import, forkscope.slot, worker_slot(), is_tracing(), pid
  /mark?label=L              forkscope.mark(L) and answer its result path (or "None")
  /own-usr2                  how often the app's own SIGUSR2 handler ran in this worker
  /gc-frozen                 gc.get_freeze_count(): objects gc.freeze() moved out of collection
  /                          hello

With LEAKY_OWN_USR2=1 the app installs its own SIGUSR2 handler at import time, as some apps
do (faulthandler-style dumps); in forkscope workers SIGUSR2 stays the profiler doorbell.
"""
import gc
import json
import os
import signal
import time
from urllib.parse import parse_qs

import forkscope

LEAK_SIZE = 10_000
KEPT = []
SLOT_AT_IMPORT = forkscope.slot
OWN_USR2_CALLS = 0


def _own_usr2(signum, frame):
    global OWN_USR2_CALLS
    OWN_USR2_CALLS += 1


if os.environ.get("LEAKY_OWN_USR2"):
    signal.signal(signal.SIGUSR2, _own_usr2)


def leak():
    KEPT.append(bytearray(LEAK_SIZE))  # LEAK


def _wait_for(path, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.005)


def _touch(path):
    with open(path, "w"):
        pass


def block(directory, n):
    _touch(os.path.join(directory, "entered"))
    _wait_for(os.path.join(directory, "go1"))
    for _ in range(n):
        leak()
    _touch(os.path.join(directory, "leaked"))
    _wait_for(os.path.join(directory, "go2"))
    return len(KEPT)


def app(environ, start_response):
    path = environ["PATH_INFO"]
    q = {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}
    if path == "/leak":
        for _ in range(int(q.get("n", "1"))):
            leak()
        body = str(len(KEPT))
    elif path == "/block":
        body = str(block(q["dir"], int(q.get("n", "1"))))
    elif path == "/slot":
        body = json.dumps(
            {
                "slot_at_import": SLOT_AT_IMPORT,
                "slot": forkscope.slot,
                "worker_slot": forkscope.worker_slot(),
                "is_tracing": forkscope.is_tracing(),
                "pid": os.getpid(),
            }
        )
    elif path == "/mark":
        body = str(forkscope.mark(q.get("label", "here")))
    elif path == "/own-usr2":
        body = str(OWN_USR2_CALLS)
    elif path == "/gc-frozen":
        body = str(gc.get_freeze_count())
    else:
        body = "Hello, World!"
    data = body.encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(data)))])
    return [data]
