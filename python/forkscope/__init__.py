# The forkscope module (docs/PROFILER.md): the same module forkscope-server's workers provide.
# Its functions and `slot` come from the compiled forkscope._native, which also runs the
# `forkscope-server` command. Outside a worker: slot None, is_tracing() False, mark() None.
import sys as _sys

from forkscope import _native

_native._adopt(_sys.modules[__name__])
