"""The smallest WSGI app: `forkscope-server --chdir examples hello:app`."""


def app(environ, start_response):
    body = b"Hello from forkscope!\n"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
