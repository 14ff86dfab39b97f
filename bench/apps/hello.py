"""Benchmark app: the smallest WSGI hello world (a fixed 13-byte body).

It counts its calls when BENCH_COUNT_DIR is set (see counting.py).
"""

from counting import calls

BODY = b"Hello, World!"
HEADERS = [("Content-Type", "text/plain"), ("Content-Length", str(len(BODY)))]


def app(environ, start_response):
    if calls is not None:
        calls.slot[0] += 1
    start_response("200 OK", HEADERS)
    return [BODY]
