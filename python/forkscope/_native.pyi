"""The compiled part of the forkscope wheel; use the forkscope package instead."""

from pathlib import Path
from types import ModuleType
from typing import List, Optional

DEFAULT_RUNTIME_DIR: str
RUNTIME_DIR_ENV: str

def main(argv: Optional[List[str]] = None) -> int:
    """Runs forkscope-server with argv (program name first; default sys.argv) and returns its
    exit status. This is the `forkscope-server` command."""

def _adopt(package: ModuleType) -> None: ...
def _install_in_gunicorn_worker(slot: int, app: str, runtime_dir: str) -> Path: ...
def _worker_exiting(reason: str) -> None: ...
def _worker_gone(runtime_dir: str, pid: int) -> bool: ...
