"""Serves a WSGI app with bjoern (one process, no workers): the harness' launcher for it.

    python bjoern_serve.py --chdir DIR --host 127.0.0.1 --port PORT module:app

bjoern has no command line of its own. It stops on SIGTERM (Python's default action: the
process ends).
"""

import argparse
import importlib
import os
import sys

import bjoern


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chdir", required=True, help="directory of the app module (put on sys.path)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("target", help="module:callable")
    args = p.parse_args()
    os.chdir(args.chdir)
    sys.path.insert(0, args.chdir)
    module, _, name = args.target.partition(":")
    app = getattr(importlib.import_module(module), name or "application")
    bjoern.run(app, args.host, args.port)


if __name__ == "__main__":
    main()
