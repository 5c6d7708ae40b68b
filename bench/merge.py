"""Benchmark: every merge method on the trained example MoE, measured with ``moetool eval``.

For each variant (8 -> 4 and 8 -> 2 experts with every method, with and without --refit-router, and
every --to-dense strategy), run ``moetool merge`` (calibration on the train split) and then
``moetool eval OUT --dataset heldout --reference examples/tiny-moe`` on the held-out split, and print
one Markdown table: perplexity, KL and top-1 next-token agreement against the original, output size
and wall times. Outputs go to a scratch folder (default /tmp/moetool-merge-bench), never the repo.

Usage::

    python bench/merge.py                                  # the README table (28 variants, ~30 min on 2 cores)
    python bench/merge.py --align-variants                 # also merging without / with activation alignment
    python bench/merge.py --only 4 --methods reap frequency
    python bench/merge.py --calib-tokens 30000 --json results.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["frequency", "soft-frequency", "reap", "search", "merge-frequency", "merge-router", "merge-output"]
MERGING = ["merge-frequency", "merge-router", "merge-output"]
DENSE = [
    ("top1", ["--no-refit-down"]),
    ("top1", []),
    ("average", ["--align", "none", "--no-refit-down"]),
    ("average", ["--no-refit-down"]),
    ("average", []),
    ("concat", ["--no-refit-down"]),
    ("concat", []),
    ("concat", ["--intermediate-size", "1024"]),
]


def run(args: list[str]) -> tuple[dict, float, str]:
    cmd = [sys.executable, "-m", "moetool", *args, "--json"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr}")
    return json.loads(proc.stdout), seconds, " ".join(["moetool", *args])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="examples/tiny-moe")
    parser.add_argument("--train", default="examples/data/train.jsonl")
    parser.add_argument("--heldout", default="examples/data/heldout.jsonl")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/moetool-merge-bench"))
    parser.add_argument("--calib-tokens", type=int, default=30_000)
    parser.add_argument("--only", nargs="*", default=["4", "2", "dense"], help="which targets: 4, 2, dense")
    parser.add_argument("--methods", nargs="*", default=METHODS)
    parser.add_argument(
        "--refit-methods",
        nargs="*",
        default=["frequency", "reap", "merge-frequency"],
        help="methods also measured with --refit-router (none: skip)",
    )
    parser.add_argument(
        "--align-variants", action="store_true", help="also measure merging methods with --align none / activations"
    )
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    args = parser.parse_args()

    args.scratch.mkdir(parents=True, exist_ok=True)
    calib = ["-d", args.train, "--max-tokens", str(args.calib_tokens), "--no-eval"]
    evaluate = ["--dataset", args.heldout, "--reference", args.model, "--max-tokens", "0"]

    variants: list[tuple[str, str, list[str]]] = []
    for m in ("4", "2"):
        if m not in args.only:
            continue
        for method in args.methods:
            base = ["--num-experts", m, "--method", method]
            variants.append((f"8->{m}", method, base))
            if method in MERGING and args.align_variants:
                variants.append((f"8->{m}", f"{method} --align none", [*base, "--align", "none"]))
                variants.append((f"8->{m}", f"{method} --align activations", [*base, "--align", "activations"]))
            if method in args.refit_methods:
                variants.append((f"8->{m}", f"{method} --refit-router", [*base, "--refit-router"]))
    if "dense" in args.only:
        for strategy, extra in DENSE:
            label = " ".join([strategy, *extra])
            variants.append(("dense", label, ["--to-dense", "--dense-strategy", strategy, *extra]))

    rows = []
    base, base_s, base_cmd = run(["eval", args.model, "--dataset", args.heldout, "--max-tokens", "0"])
    rows.append({"target": "original", "method": "-", "eval": base, "eval_s": base_s, "eval_cmd": base_cmd})
    for target, label, extra in variants:
        out = args.scratch / f"{target.replace('->', 'to')}-{label.replace(' ', '_').replace('-', '')}"
        shutil.rmtree(out, ignore_errors=True)
        merged, merge_s, merge_cmd = run(["merge", args.model, "-o", str(out), *extra, *calib])
        figures, eval_s, eval_cmd = run(["eval", str(out), *evaluate])
        rows.append(
            {
                "target": target,
                "method": label,
                "merge": merged,
                "merge_s": merge_s,
                "merge_cmd": merge_cmd,
                "eval": figures,
                "eval_s": eval_s,
                "eval_cmd": eval_cmd,
            }
        )
        print(
            f"{target:7} {label:28} ppl {figures['perplexity']:9.2f}  top-1 {figures['top1_agreement']:.4f}  "
            f"merge {merge_s:5.1f}s",
            file=sys.stderr,
            flush=True,
        )

    print("| target | method | perplexity | KL | top-1 agreement | size | merge wall time |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for row in rows:
        figures = row["eval"]
        size = row["merge"]["size"]["written_bytes"] if "merge" in row else None
        kl = "-" if figures.get("kl") is None else f"{figures['kl']:.4f}"
        top1 = "-" if figures.get("top1_agreement") is None else f"{100 * figures['top1_agreement']:.2f}%"
        size_text = "-" if size is None else f"{size / 1e6:.2f} MB"
        wall = "-" if "merge_s" not in row else f"{row['merge_s']:.1f} s"
        ppl = f"{figures['perplexity']:.2f}"
        print(f"| {row['target']} | {row['method']} | {ppl} | {kl} | {top1} | {size_text} | {wall} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
