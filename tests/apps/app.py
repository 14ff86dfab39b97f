"""The test WSGI app: one route per behaviour the integration tests check."""
import json
import os
import sys
import threading
import time
from urllib.parse import parse_qs

_SAFE = (str, int, float, bool, tuple, type(None))
_per_thread = threading.local()


def _qs(environ):
    return {k: v[0] for k, v in parse_qs(environ.get("QUERY_STRING", "")).items()}


def app(environ, start_response):
    path = environ["PATH_INFO"]
    q = _qs(environ)
    if path == "/":
        body = b"Hello, World!"
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]
    if path.startswith("/environ"):
        safe = {k: (v if isinstance(v, _SAFE) else repr(type(v))) for k, v in environ.items()}
        body = json.dumps(safe, default=str).encode()
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body]
    if path == "/echo":
        size = environ.get("CONTENT_LENGTH")
        mode = q.get("mode", "read")
        inp = environ["wsgi.input"]
        if mode == "lines":
            data = b"".join(inp.readlines())
        elif mode == "iter":
            data = b"".join(iter(inp))
        elif mode == "chunks":
            parts = []
            while True:
                part = inp.read(int(q.get("n", "7")))
                if not part:
                    break
                parts.append(part)
            data = b"".join(parts)
        else:
            data = inp.read()
        start_response("200 OK", [("Content-Type", "application/octet-stream"), ("X-Content-Length", str(size))])
        return [data]
    if path == "/digest":
        # Streams the body through a hash: proves large uploads arrive whole.
        import hashlib
        h = hashlib.sha256()
        total = 0
        while True:
            chunk = environ["wsgi.input"].read(65536)
            if not chunk:
                break
            h.update(chunk)
            total += len(chunk)
        body = json.dumps({"sha256": h.hexdigest(), "size": total}).encode()
        start_response("200 OK", [("Content-Type", "application/json")])
        return [body]
    if path == "/stream":
        n = int(q.get("n", "3"))

        def gen():
            for i in range(n):
                yield f"chunk{i}\n".encode()
        start_response("200 OK", [("Content-Type", "text/plain")])
        return gen()
    if path == "/large":
        n = int(q.get("n", "65536"))
        body = b"x" * n
        start_response("200 OK", [("Content-Type", "application/octet-stream"), ("Content-Length", str(n))])
        return [body]
    if path == "/write":
        write = start_response("200 OK", [("Content-Type", "text/plain")])
        write(b"written ")
        return [b"and returned"]
    if path == "/error":
        raise RuntimeError("boom from the test app")
    if path == "/error-after-head":
        def gen():
            yield b"partial"
            raise RuntimeError("boom mid-stream")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return gen()
    if path == "/bad-type":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return ["not bytes"]
    if path == "/no-start":
        return [b"forgot start_response"]
    if path == "/sleep":
        time.sleep(float(q.get("s", "1")))
        body = f"slept {os.getpid()}".encode()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]
    if path == "/pid":
        body = str(os.getpid()).encode()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]
    if path == "/barrier":
        # Succeeds only when `n` requests are inside the app at the same time.
        try:
            _barrier(int(q.get("n", "2"))).wait(timeout=float(q.get("t", "20")))
            status, body = "200 OK", b"met"
        except threading.BrokenBarrierError:
            status, body = "504 Gateway Timeout", b"alone"
        start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]
    if path == "/hold":
        # Writes `marker`, then stays in the app until the file `release` exists (at most `t`
        # seconds): the test knows the request is inside the app and ends it when it chooses.
        with open(q["marker"], "w") as f:
            f.write(str(os.getpid()))
        deadline = time.monotonic() + float(q.get("t", "60"))
        while not os.path.exists(q["release"]) and time.monotonic() < deadline:
            time.sleep(0.01)
        body = b"released"
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]
    if path == "/osenv":
        body = os.environ.get(q.get("k", ""), "<unset>").encode()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]
    if path == "/thread":
        body = threading.current_thread().name.encode()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]
    if path == "/thread-local":
        # How many requests this thread has served, kept in a threading.local (as apps keep a
        # per-thread database connection): "<thread ident> <count> <main thread: 0/1>".
        _per_thread.served = getattr(_per_thread, "served", 0) + 1
        main = int(threading.current_thread() is threading.main_thread())
        body = f"{threading.get_ident()} {_per_thread.served} {main}".encode()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]
    if path == "/close":
        closed_marker = q.get("marker")

        class Body:
            def __iter__(self):
                yield b"body"

            def close(self):
                if closed_marker:
                    with open(closed_marker, "w") as f:
                        f.write("closed")
        start_response("200 OK", [("Content-Type", "text/plain")])
        return Body()
    if path == "/file":
        # A real file (sent with sendfile), optionally from an offset, with or without a length.
        f = open(__file__, "rb")
        seek = int(q.get("seek", "0"))
        f.seek(seek)
        headers = [("Content-Type", "text/plain")]
        if "nolength" not in q:
            headers.append(("Content-Length", str(os.path.getsize(__file__) - seek)))
        start_response("200 OK", headers)
        return environ["wsgi.file_wrapper"](f, 4096)
    if path == "/bytesio":
        # No file descriptor: the wrapper is iterated in blocks instead.
        import io
        start_response("200 OK", [("Content-Type", "text/plain")])
        return environ["wsgi.file_wrapper"](io.BytesIO(b"in-memory " * 1000), 64)
    if path == "/status":
        code = q.get("code", "204 No Content")
        start_response(code, [])
        return []
    if path == "/errors":
        environ["wsgi.errors"].write("message to wsgi.errors\n")
        environ["wsgi.errors"].flush()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "2")])
        return [b"ok"]
    start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", "9")])
    return [b"not found"]


_barriers = {}


def _barrier(n):
    # setdefault is one step under the GIL: requests arriving together share one barrier.
    return _barriers.setdefault(n, threading.Barrier(n))


def create_app(greeting="hi"):
    """A factory, for the MODULE:factory(...) form."""
    def factory_app(environ, start_response):
        body = greeting.encode()
        start_response("200 OK", [("Content-Length", str(len(body)))])
        return [body]
    return factory_app
