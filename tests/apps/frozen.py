"""Reports the cyclic garbage collector's state as the worker serving the request sees it:
proves that --preload freezes the app (gc.freeze) and that a reload re-freezes it."""
import gc
import json
import os

# Objects frozen while this module was imported: 0 at every import, since a reload unfreezes
# the old app before it imports the new one.
FROZEN_AT_IMPORT = gc.get_freeze_count()
# Tells one import of this module from the next (a reload imports it again).
IMPORT_ID = os.urandom(8).hex()


def app(environ, start_response):
    body = json.dumps({
        "freeze_count": gc.get_freeze_count(),
        "frozen_at_import": FROZEN_AT_IMPORT,
        "gc_enabled": gc.isenabled(),
        "import_id": IMPORT_ID,
        "pid": os.getpid(),
    }).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
