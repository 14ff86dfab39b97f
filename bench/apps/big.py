"""Benchmark app: a 64 KiB response body, built once at import.

It counts its calls when BENCH_COUNT_DIR is set (see counting.py).
"""

from counting import calls

BODY = bytes(range(256)) * 256  # 65,536 bytes
HEADERS = [("Content-Type", "application/octet-stream"), ("Content-Length", str(len(BODY)))]


def app(environ, start_response):
    if calls is not None:
        calls.slot[0] += 1
    start_response("200 OK", HEADERS)
    return [BODY]
