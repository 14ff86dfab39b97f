"""Benchmark app: Flask's hello world (routing, request and response objects)."""

from flask import Flask

app = Flask(__name__)


@app.route("/")
def hello():
    return "Hello, World!"
