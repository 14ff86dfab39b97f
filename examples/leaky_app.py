"""A WSGI app that leaks memory on purpose, for trying forkscope (examples/app.yaml runs it).

Every request to /leak keeps one more 100 kB bytearray alive for the life of the worker, on the
line marked "# LEAK": a heap diff through the sidecar names that line, and the worker's PSS grows
on the dashboard. Any other path answers hello. Plain WSGI: it runs under gunicorn too.

    forkscope-server --chdir examples -w 2 leaky_app:app
    curl localhost:8000/leak?n=10
"""
from urllib.parse import parse_qs

KEPT = []


def leak(n):
    for _ in range(n):
        KEPT.append(bytearray(100_000))  # LEAK


def app(environ, start_response):
    if environ["PATH_INFO"] == "/leak":
        query = parse_qs(environ.get("QUERY_STRING", ""))
        leak(int(query.get("n", ["1"])[0]))
        body = f"kept {len(KEPT)}\n".encode()
    else:
        body = b"Hello from forkscope!\n"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
