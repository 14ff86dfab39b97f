"""The compiled part of the forkscope wheel; use the forkscope package instead."""

from types import ModuleType
from typing import List, Optional

def main(argv: Optional[List[str]] = None) -> int:
    """Runs forkscope-server with argv (program name first; default sys.argv) and returns its
    exit status. This is the `forkscope-server` command."""

def _adopt(package: ModuleType) -> None: ...
