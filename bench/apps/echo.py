"""Benchmark app: echoes a POST body back (reads wsgi.input by CONTENT_LENGTH).

It counts its calls when BENCH_COUNT_DIR is set (see counting.py).
"""

from counting import calls


def app(environ, start_response):
    if calls is not None:
        calls.slot[0] += 1
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    body = environ["wsgi.input"].read(length) if length > 0 else b""
    start_response(
        "200 OK",
        [("Content-Type", "application/octet-stream"), ("Content-Length", str(len(body)))],
    )
    return [body]
