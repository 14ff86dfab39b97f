"""Importable only through --pythonpath (its folder is not the working directory)."""


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
    return [b"far"]
