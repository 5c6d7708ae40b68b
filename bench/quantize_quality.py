"""Quality of ``moetool quantize`` on the example MoE: bits per expert parameter, perplexity, KL, top-1.

Runs the command line exactly as a user would, one configuration after another:

    moetool quantize examples/tiny-moe -o OUT --method M --bits B --group-size G \\
        -d examples/data/train.jsonl --max-tokens 65536 --seq-len 256 --json
    moetool eval OUT --dataset examples/data/heldout.jsonl --reference examples/tiny-moe --max-tokens 0 --json

and prints a Markdown table (``--json``: the raw figures). Bits per expert parameter come from the
bytes of the written files (codes, scales, zero points). ``--only`` runs the configurations whose label
contains any of the given strings.

Usage::

    python bench/quantize_quality.py                    # every configuration (about half an hour on 2 cores)
    python bench/quantize_quality.py --only "w4 g64" nf4
"""

from __future__ import annotations

import sys
from pathlib import Path

# Running `python bench/X.py` puts bench/ first on sys.path, where bench/inspect.py would shadow the
# standard library's inspect module: drop it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import os
import subprocess
import tempfile
import time

ROOT = Path(__file__).resolve().parents[1]
MODEL = "examples/tiny-moe"
CALIBRATION = ["-d", "examples/data/train.jsonl", "--max-tokens", "65536", "--seq-len", "256"]
HELDOUT = ["--dataset", "examples/data/heldout.jsonl", "--reference", MODEL, "--max-tokens", "0"]

# label -> extra quantize arguments
CONFIGS: dict[str, list[str]] = {}
for _group in ("64", "32"):
    for _bits in ("8", "4", "3", "2"):
        if _group == "32" and _bits == "8":
            continue
        for _method in ("rtn", "gptq"):
            CONFIGS[f"{_method} w{_bits} g{_group}"] = ["--method", _method, "--bits", _bits, "--group-size", _group]
for _method in ("rtn", "gptq"):
    CONFIGS[f"{_method} w4 g128"] = ["--method", _method, "--bits", "4", "--group-size", "128"]
CONFIGS["nf4 g64"] = ["--method", "nf4", "--group-size", "64"]
CONFIGS["rtn ternary per-row"] = ["--method", "rtn", "--ternary", "--group-size", "0"]
CONFIGS["gptq ternary per-row"] = ["--method", "gptq", "--ternary", "--group-size", "0"]
CONFIGS["gptq w2 g64 all-experts"] = ["--method", "gptq", "--bits", "2", "--group-size", "64", "--calib-all-experts"]


def moetool(*args: str) -> dict:
    env = {**os.environ, "NO_COLOR": "1", "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "moetool", *args], capture_output=True, text=True, cwd=ROOT, env=env, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"moetool {' '.join(args)} failed:\n{done.stderr}")
    doc = json.loads(done.stdout)
    doc["_wall"] = time.perf_counter() - started
    return doc


def run(label: str, extra: list[str], tmp: Path) -> dict:
    out = tmp / label.replace(" ", "-")
    calibration = CALIBRATION if "gptq" in extra else []
    quantized = moetool("quantize", MODEL, "-o", str(out), *extra, *calibration, "--json")
    evaluated = moetool("eval", str(out), *HELDOUT, "--json")
    return {
        "label": label,
        "args": extra + calibration,
        "expert_bits": quantized["expert_bits_per_param"],
        "total_bits": quantized["bits_per_param"]["total"]["bits_per_param"],
        "quantize_s": quantized["timings"]["total"],
        "quantize_wall_s": round(quantized["_wall"], 1),
        "perplexity": evaluated["perplexity"],
        "kl": evaluated["kl"],
        "top1": evaluated["top1_agreement"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", help="run the configurations whose label contains one of these")
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of the table")
    args = parser.parse_args()
    base = moetool("eval", MODEL, *HELDOUT, "--json")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, extra in CONFIGS.items():
            if args.only and not any(part in label for part in args.only):
                continue
            row = run(label, extra, Path(tmp))
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps({"original_perplexity": base["perplexity"], "rows": rows}, indent=2))
        return
    print(f"original perplexity {base['perplexity']:.4f} ({base['tokens']:,} held-out tokens)")
    print("| method | bits / expert param (disk) | perplexity | vs original | KL | top-1 agreement | quantize time |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        change = 100 * (row["perplexity"] / base["perplexity"] - 1)
        print(
            f"| {row['label']} | {row['expert_bits']:.3f} | {row['perplexity']:.3f} | {change:+.2f}% "
            f"| {row['kl']:.5f} | {100 * row['top1']:.2f}% | {row['quantize_s']:.1f} s |"
        )


if __name__ == "__main__":
    main()
