"""The app of tests/hardening.rs: routes that let a test hold a worker or race its threads."""
import os

# The file a /sendfile response is sending, for /swap to tamper with.
_sending = {}


def _text(start_response, body, status="200 OK"):
    body = body.encode()
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def app(environ, start_response):
    path = environ["PATH_INFO"]
    query = dict(p.split("=", 1) for p in environ.get("QUERY_STRING", "").split("&") if "=" in p)
    if path == "/sendfile":
        # A regular file through wsgi.file_wrapper: sent with sendfile(2).
        f = open(query["path"], "rb")
        _sending["file"] = f
        size = os.fstat(f.fileno()).st_size
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(size))])
        return environ["wsgi.file_wrapper"](f, 65536)
    if path == "/swap":
        # What another thread may do while the file is being sent: the file object's
        # descriptor number ends up naming another file (closed, and the number reused).
        number = _sending["file"].fileno()
        with open(query["path"], "rb") as other:
            os.dup2(other.fileno(), number)
        return _text(start_response, "swapped")
    if path == "/hold":
        # Keeps this worker thread inside the app until the test closes its end of the FIFO.
        with open(query["fifo"], "rb") as fifo:
            fifo.read()
        return _text(start_response, "released")
    if path == "/pid":
        return _text(start_response, str(os.getpid()))
    if path == "/echo":
        return _text(start_response, environ["wsgi.input"].read().decode("latin-1"))
    return _text(start_response, "ok")
