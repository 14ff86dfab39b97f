"""Records every import in a file named by FORKSCOPE_TEST_IMPORTS: proves preload imports once."""
import os

with open(os.environ["FORKSCOPE_TEST_IMPORTS"], "a") as f:
    f.write(f"{os.getpid()}\n")


def app(environ, start_response):
    body = str(os.getpid()).encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
