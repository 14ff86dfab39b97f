"""Benchmark app: Flask's hello world (routing, request and response objects).

The view counts its calls when BENCH_COUNT_DIR is set (see counting.py).
"""

from counting import calls
from flask import Flask

app = Flask(__name__)


@app.route("/")
def hello():
    if calls is not None:
        calls.slot[0] += 1
    return "Hello, World!"
