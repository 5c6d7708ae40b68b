"""Run one ``moetool`` command in this process and record its peak memory (for bench/memory.py).

Usage: ``python bench/peak.py REPORT.json ARGS...`` runs ``moetool ARGS...`` and writes
``{"rss_bytes": ..., "cuda_peak_bytes": ...}`` to REPORT.json: the process's peak resident set size
(``getrusage``: everything the process touched, weights, activations, libraries and file pages it mapped)
and, when CUDA was used, ``torch.cuda.max_memory_allocated``. The command's own exit code is kept.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import json
import resource


def main() -> int:
    report, args = Path(sys.argv[1]), sys.argv[2:]
    from moetool.cli import app

    code = 0
    try:
        app(args=args, prog_name="moetool", standalone_mode=True)
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    figures = {"rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        figures["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated())
    report.write_text(json.dumps(figures))
    return code


if __name__ == "__main__":
    sys.exit(main())
