"""gunicorn config for the memory benchmark: the hand-added gc.freeze() users put in a hook.

With --preload the master has imported the app when pre_fork runs, so freezing here moves every
object the import made into the permanent generation before the workers are forked.
"""

import gc


def pre_fork(server, worker):
    gc.freeze()
