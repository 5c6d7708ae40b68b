"""SIGBUS, the crash of an input file truncated while it is memory-mapped, turned into one line.

safetensors and transformers read weights through ``mmap``. When another program truncates or
rewrites a shard during a run, touching the vanished pages raises SIGBUS, which kills the process
(exit 135) and leaves its lock and staging folder behind. A Python-level handler cannot help: Python
would run it only after the faulting C instruction, which faults again for ever. So the handler is a
C-level one (through ctypes): it prints the error line, removes this process's staging folders and
locks (:func:`moetool.io.writer.abandon_active_outputs`) and exits with code 1 at once.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

MESSAGE = "an input file changed while being read (it was truncated or replaced while moetool had it mapped)"
HINT = "make sure no other program writes the model while moetool runs, then run the command again; nothing was written"

# The ctypes callback must outlive install(): a collected callback would leave a dangling pointer.
_installed: Any = None
# Looked up at install time: a crashing process should not go through the import machinery.
_abandon: Any = None


def _on_bus_error(_signum: int) -> None:
    try:
        os.write(2, f"error: {MESSAGE} ({HINT})\n".encode())
        if "--json" in sys.argv[1:]:
            doc = {"code": "INPUT_CHANGED", "message": MESSAGE, "hint": HINT, "exit_code": 1}
            os.write(1, (json.dumps({"schema_version": 1, "error": doc}, indent=2) + "\n").encode())
        if _abandon is not None:
            _abandon()
    finally:
        os._exit(1)


def install_fault_handlers() -> bool:
    """Install the SIGBUS handler for this process (POSIX only; a no-op elsewhere).

    Returns:
        Whether a handler is installed.
    """
    global _installed, _abandon
    if _installed is not None:
        return True
    if os.name != "posix" or not hasattr(signal, "SIGBUS"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:  # pragma: no cover - every POSIX Python can open its own process
        return False
    callback_type = ctypes.CFUNCTYPE(None, ctypes.c_int)
    callback = callback_type(_on_bus_error)
    libc.signal.restype = ctypes.c_void_p
    libc.signal.argtypes = [ctypes.c_int, callback_type]
    from moetool.io.writer import abandon_active_outputs

    _abandon = abandon_active_outputs
    libc.signal(int(signal.SIGBUS), callback)
    _installed = callback
    return True
