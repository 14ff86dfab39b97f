"""Benchmark app for the memory table: builds ~180 MB of Python objects at import.

The data is deterministic and container-heavy (dicts, lists, tuples holding small strings and
numbers), like the caches, registries and ORM metadata real apps build at import. A full garbage
collection walks every container and writes to its GC header, which is what dirties shared
copy-on-write pages in forked workers unless `gc.freeze()` moved them out of the collector's reach.

Endpoints (every answer is the worker's PID, so the harness knows who answered):
  /      a plain hello that touches none of the data
  /gc    runs a full `gc.collect()` in this worker
  /pid   like / but waits `?hold=SECONDS` (at most 1) first, to spread concurrent requests over workers

With BENCH_GC_FREEZE_AT_IMPORT=1 the module calls `gc.freeze()` at the end of its import (the
hand-added freeze for servers without a hook, e.g. uWSGI, which imports in the master).
"""

import gc
import os
import time

RECORDS = int(os.environ.get("BENCH_MEM_RECORDS", "215000"))


def _record(i):
    return {
        "id": i,
        "name": "user-%08d" % i,
        "email": "user%d@example.com" % i,
        "tags": ["t%d" % (i % 97), "g%d" % (i % 13), "k%d" % (i % 7)],
        "pos": (i % 1000, i // 1000),
        "score": i * 0.5,
    }


DATA = [_record(i) for i in range(RECORDS)]

if os.environ.get("BENCH_GC_FREEZE_AT_IMPORT") == "1":
    gc.freeze()


def _answer(start_response, body):
    start_response(
        "200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
    )
    return [body]


def app(environ, start_response):
    path = environ.get("PATH_INFO", "/")
    if path == "/gc":
        gc.collect()
    elif path == "/pid":
        query = environ.get("QUERY_STRING", "")
        if query.startswith("hold="):
            try:
                time.sleep(min(max(float(query[5:]), 0.0), 1.0))
            except ValueError:
                pass
    return _answer(start_response, str(os.getpid()).encode())
