"""Benchmark: ``moetool quantize`` and ``moetool merge`` beside a busy process, by CPU thread setting.

Target (issue 15): on a machine where another process keeps a core busy, the commands with their
default thread policy (``moetool.threads``: the idle cores) are no slower than with
``OMP_NUM_THREADS=1``. Before the policy, torch's default (one thread per core) spun OpenMP threads
against the other process: 91-111 s for quantize against 28.6 s with one thread on the 2-core machine.

For each command and each setting the whole CLI process is timed (wall clock, model loading and
writing included), ``--runs`` times, alternating the settings, and the median is reported with the
thread count the command chose (from its ``--json``). Settings:

* ``default``: no ``--threads``, no ``OMP_NUM_THREADS`` (the policy picks the idle cores);
* ``omp1``: ``OMP_NUM_THREADS=1``;
* ``all-cores``: ``--threads <usable cores>``, what torch's own default did;
* ``all-cores-gptq``: the same with ``MOETOOL_GPTQ_THREADS=0`` (quantize's GPTQ on all cores too, its
  bytes then depending on the thread count: the price of reproducible GPTQ on a quiet machine).

The busy process (``--busy N`` of them; 0 for a quiet run) is a Python loop spinning on one core,
started before each run (and given a second to show up in the CPU counters) and killed after it.

Usage::

    python bench/threads.py                          # quantize and merge, 1 busy process, 2 runs each
    python bench/threads.py --busy 0 --runs 3        # quiet machine
    python bench/threads.py --commands quantize --settings default omp1
"""

from __future__ import annotations

import sys
from pathlib import Path

# Running `python bench/X.py` puts bench/ first on sys.path, where bench/inspect.py would shadow the
# standard library's inspect module (which torch and dataclasses import): drop it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time

MODEL = str(ROOT / "examples" / "tiny-moe")
DATA = str(ROOT / "examples" / "data" / "train.jsonl")

#: The commands as the README times them (quantize: the defaults, GPTQ 4-bit on 65,536 tokens; merge:
#: 8 -> 4 experts with the default method on 30,000 tokens, no evaluation).
COMMANDS = {
    "quantize": ["quantize", MODEL, "-d", DATA],
    "merge": ["merge", MODEL, "--num-experts", "4", "-d", DATA, "--max-tokens", "30000", "--no-eval"],
}
SETTINGS = ("default", "omp1", "all-cores", "all-cores-gptq")
DEFAULT_SETTINGS = ("default", "omp1", "all-cores")


def spinner() -> subprocess.Popen:
    """A process that keeps one core busy until killed."""
    return subprocess.Popen([sys.executable, "-c", "while True:\n    pass"])


def run_once(command: str, setting: str, busy: int, cores: int) -> dict:
    """Time one CLI run of ``command`` with ``setting`` beside ``busy`` spinning processes."""
    unset = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "MOETOOL_GPTQ_THREADS")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env.update({"HF_HUB_OFFLINE": "1", "NO_COLOR": "1"})
    args = list(COMMANDS[command])
    if setting == "omp1":
        env["OMP_NUM_THREADS"] = "1"
    elif setting.startswith("all-cores"):
        args += ["--threads", str(cores)]
        if setting == "all-cores-gptq":
            env["MOETOOL_GPTQ_THREADS"] = "0"
    out = Path(tempfile.mkdtemp(prefix="moetool-bench-threads-")) / "out"
    spinners = [spinner() for _ in range(busy)]
    try:
        if spinners:
            time.sleep(1.0)  # let the spinners reach the CPU counters the policy samples
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "moetool", *args, "-o", str(out), "--json"],
            capture_output=True,
            text=True,
            env=env,
            cwd=ROOT,
        )
        wall = time.perf_counter() - start
    finally:
        for process in spinners:
            process.kill()
            process.wait()
        shutil.rmtree(out.parent, ignore_errors=True)
    if done.returncode != 0:
        raise SystemExit(f"{command} ({setting}) failed:\n{done.stderr[-2000:]}")
    threads = json.loads(done.stdout).get("threads")
    return {"command": command, "setting": setting, "busy": busy, "wall_s": wall, "threads": threads}


def main() -> None:
    from moetool.threads import usable_cores

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commands", nargs="+", choices=sorted(COMMANDS), default=["quantize", "merge"])
    parser.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(DEFAULT_SETTINGS))
    parser.add_argument("--busy", type=int, default=1, help="spinning processes beside each run (0: none)")
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    cores = usable_cores()

    rows = []
    for command in args.commands:
        runs: dict[str, list[dict]] = {s: [] for s in args.settings}
        for _ in range(args.runs):
            for setting in args.settings:  # alternating, so that slow phases of the machine hit all settings
                row = run_once(command, setting, args.busy, cores)
                runs[setting].append(row)
                print(f"{command:<9} {setting:<14} {row['threads']} thread(s) {row['wall_s']:7.1f}s", file=sys.stderr)
        for setting, done in runs.items():
            walls = [r["wall_s"] for r in done]
            rows.append(
                {
                    "command": command,
                    "setting": setting,
                    "busy": args.busy,
                    "threads": sorted({r["threads"] for r in done}),
                    "median_s": statistics.median(walls),
                    "runs_s": [round(w, 1) for w in walls],
                }
            )
    if args.json:
        print(json.dumps({"cores": cores, "rows": rows}, indent=1))
        return
    print(f"{cores} usable cores, {args.busy} busy process(es), median of {args.runs} run(s)")
    print(f"{'command':<9} {'setting':<14} {'threads':>8} {'median':>8}  runs")
    for row in rows:
        threads = ",".join(map(str, row["threads"]))
        print(f"{row['command']:<9} {row['setting']:<14} {threads:>8} {row['median_s']:>7.1f}s  {row['runs_s']}")


if __name__ == "__main__":
    main()
