"""Benchmark: ``moetool distill`` on the trained example MoE, against cross-entropy alone and a dense baseline.

For each variant (the defaults; the same student trained with cross-entropy only; random initialisation;
other temperatures, weights and widths), run ``moetool distill examples/tiny-moe`` on the train split with
the held-out split for evaluation, and time the whole command. Then measure a dense model of the
student's size trained from scratch by ``examples/train_tiny_moe.py --dense`` for as long as the teacher
was (900 steps), with ``moetool eval``, and print one Markdown table: perplexity at init and trained,
against the teacher, KL and top-1 agreement, wall time, and the share of the MoE's gain over the dense
model that each student keeps. Outputs go to a scratch folder (default /tmp/moetool-distill-bench),
never the repository.

Usage::

    python bench/distill.py                                   # the docs table (~1 h on 2 busy cores)
    python bench/distill.py --variants default ce-only        # a subset
    python bench/distill.py --dense-baseline 512=/tmp/tiny-dense-512   # reuse a trained dense baseline
    python bench/distill.py --reuse                           # keep results already in the scratch folder
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
if str(ROOT / "bench") in sys.path:  # bench/inspect.py would shadow the stdlib module
    sys.path.remove(str(ROOT / "bench"))

# name -> (extra distill options, what it shows). Everything else is the command's defaults.
VARIANTS: dict[str, tuple[list[str], str]] = {
    "default": ([], "the defaults: --init concat (FFN 512), alpha 0.9, T 1, 300 steps"),
    "ce-only": (["--alpha", "0"], "the same student and steps, cross-entropy only"),
    "steps-200": (["--steps", "200"], "the defaults, 200 steps"),
    "steps-400": (["--steps", "400"], "the defaults, 400 steps"),
    # Ablations at 200 steps: one setting changed from the defaults.
    "ce-only-200": (["--steps", "200", "--alpha", "0"], "cross-entropy only"),
    "random-init-200": (["--steps", "200", "--init", "random"], "random initialisation, same width and loss"),
    "random-ce-only-200": (["--steps", "200", "--init", "random", "--alpha", "0"], "random init, cross-entropy only"),
    "kd-only-200": (["--steps", "200", "--alpha", "1"], "KD term only"),
    "t2-200": (["--steps", "200", "--temperature", "2"], "temperature 2"),
    "lr-2e-3-200": (["--steps", "200", "--lr", "2e-3"], "twice the learning rate"),
    "top1-init-200": (["--steps", "200", "--init", "top1"], "the most used expert per layer (FFN 256)"),
    "average-init-200": (["--steps", "200", "--init", "average"], "the experts averaged (FFN 256)"),
    "cached-top64-200": (["--steps", "200", "--cache-topk", "64"], "teacher cached as top-64, then freed"),
    "concat-1024-200": (["--steps", "200", "--intermediate-size", "1024"], "a wider student (FFN 1024)"),
    # A narrower student, beside a dense model of its width (where the MoE beats the dense model).
    "concat-256": (["--intermediate-size", "256"], "a narrower student (FFN 256), default steps"),
    "concat-256-ce-only": (["--intermediate-size", "256", "--alpha", "0"], "FFN 256, cross-entropy only"),
    # The dense baseline's budget (900 steps x 16 windows): Switch Transformers' comparison. Not in the defaults.
    "matched-256": (["--intermediate-size", "256", "--steps", "900", "--batch-size", "16"], "FFN 256, 3.7M tokens"),
}
DEFAULT_VARIANTS = [
    "default",
    "ce-only",
    "steps-200",
    "steps-400",
    "ce-only-200",
    "random-init-200",
    "random-ce-only-200",
    "kd-only-200",
    "t2-200",
    "lr-2e-3-200",
    "top1-init-200",
    "cached-top64-200",
    "concat-256",
    "concat-256-ce-only",
]


def run(cmd: list[str], *, json_out: bool = True) -> tuple[dict | None, float]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return (json.loads(proc.stdout) if json_out else None), seconds


def distill_variant(name: str, args: argparse.Namespace) -> dict:
    record = args.scratch / f"{name}.json"
    if args.reuse and record.exists():
        return json.loads(record.read_text())
    out = args.scratch / name
    for path in (out, args.scratch / f"{name}.partial"):
        shutil.rmtree(path, ignore_errors=True)
    extra, _ = VARIANTS[name]
    cmd = ["moetool", "distill", args.model, "-o", str(out), "-d", args.train, "--eval-dataset", args.heldout, *extra]
    print(f"[{name}] {' '.join(cmd)}", file=sys.stderr, flush=True)
    doc, seconds = run([sys.executable, "-m", "moetool", *cmd[1:], "--json"])
    assert doc is not None
    result = {"name": name, "command": " ".join(cmd), "wall_s": round(seconds, 1), "doc": doc}
    record.write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(out, ignore_errors=True)  # the figures are what we keep
    return result


def dense_baseline(args: argparse.Namespace, width: int) -> dict | None:
    """Held-out perplexity of a dense model of this FFN width trained from scratch like the teacher (900 steps)."""
    record = args.scratch / f"dense-{width}.json"
    if args.reuse and record.exists():
        return json.loads(record.read_text())
    folder = args.dense_baseline.get(width)
    train_s = None
    if folder is None:
        if args.no_dense:
            return None
        folder = args.scratch / f"tiny-dense-{width}"
        cmd = [sys.executable, "examples/train_tiny_moe.py", "--dense", "--intermediate-size", str(width),
               "--out", str(folder), "--threads", str(args.threads)]  # fmt: skip
        print(f"[dense-{width}] {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        _, train_s = run(cmd, json_out=False)
    doc, _ = run([sys.executable, "-m", "moetool", "eval", str(folder), "--dataset", args.heldout, "--max-tokens", "0",
                  "--json"])  # fmt: skip
    assert doc is not None
    training_file = Path(folder) / "TRAINING.json"
    training = json.loads(training_file.read_text()) if training_file.exists() else {}
    result = {
        "width": width,
        "folder": str(folder),
        "command": f"python examples/train_tiny_moe.py --dense --intermediate-size {width} --out {folder}",
        "perplexity": doc["perplexity"],
        "train_wall_s": train_s,
        "params": (training.get("parameters") or {}).get("total"),
        "steps": (training.get("settings") or {}).get("steps"),
    }
    record.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _kept(ppl: float, dense: dict | None, teacher: float) -> str:
    if dense is None:
        return "-"
    if dense["perplexity"] <= teacher:
        return "n/a"
    return f"{100 * (dense['perplexity'] - ppl) / (dense['perplexity'] - teacher):.0f}%"


def table(results: list[dict], dense: dict[int, dict]) -> str:
    teacher = results[0]["doc"]["eval"]["teacher_perplexity"]
    lines = [
        f"Teacher ({results[0]['doc']['teacher']}, {results[0]['doc']['teacher_params']:,} parameters): held-out "
        f"perplexity {teacher:.3f}.",
        "",
        "| variant | student | steps | alpha | T | ppl at init | ppl trained | vs teacher | KL | top-1 | "
        "gain kept | wall |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        doc, ev, tr = r["doc"], r["doc"]["eval"], r["doc"]["training"]
        student = doc["student"]
        ppl = ev["student_perplexity"]
        kl = "-" if ev["student_kl"] is None else f"{ev['student_kl']:.4f}"
        top1 = "-" if ev["student_top1_agreement"] is None else f"{100 * ev['student_top1_agreement']:.1f}%"
        kept = _kept(ppl, dense.get(student["intermediate_size"]), teacher)
        lines.append(
            f"| {r['name']} | {student['init']} {student['intermediate_size']} ({student['params'] / 1e6:.2f}M) | "
            f"{tr['steps']} | {tr['alpha']:g} | {tr['temperature']:g} | {ev['student_init_perplexity']:.3f} | "
            f"{ppl:.3f} | {100 * (ppl / teacher - 1):+.1f}% | {kl} | {top1} | {kept} | {r['wall_s'] / 60:.1f} min |"
        )
    for width, baseline in sorted(dense.items(), reverse=True):
        params = f"{baseline['params'] / 1e6:.2f}M" if baseline.get("params") else "?"
        ppl = baseline["perplexity"]
        wall = f"{baseline['train_wall_s'] / 60:.1f} min" if baseline.get("train_wall_s") else "-"
        lines.append(
            f"| dense-{width} from scratch | random {width} ({params}) | {baseline.get('steps') or 900} x 4096 tokens "
            f"| - | - | - | {ppl:.3f} | {100 * (ppl / teacher - 1):+.1f}% | - | - | - | {wall} |"
        )
    lines += [
        "",
        "gain kept = (ppl dense - ppl student) / (ppl dense - ppl teacher), against the dense model of the student's "
        "FFN width trained from scratch; n/a where that dense model is better than the MoE (no gain to keep).",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="examples/tiny-moe")
    parser.add_argument("--train", default="examples/data/train.jsonl")
    parser.add_argument("--heldout", default="examples/data/heldout.jsonl")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/moetool-distill-bench"))
    parser.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    parser.add_argument(
        "--dense-baseline",
        nargs="*",
        default=[],
        metavar="WIDTH=PATH",
        help="trained dense baselines to evaluate instead of training them (e.g. 512=/tmp/tiny-dense-512)",
    )
    parser.add_argument("--dense-widths", nargs="*", type=int, default=[512, 256], help="dense baselines to compare")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense-from-scratch baselines")
    parser.add_argument("--threads", type=int, default=1, help="threads for the dense baseline's training script")
    parser.add_argument("--reuse", action="store_true", help="reuse results already in the scratch folder")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args()
    args.dense_baseline = {int(w): Path(p) for w, p in (item.split("=", 1) for item in args.dense_baseline)}
    args.scratch.mkdir(parents=True, exist_ok=True)
    results = [distill_variant(name, args) for name in args.variants]
    dense = {w: d for w in args.dense_widths if (d := dense_baseline(args, w)) is not None}
    print(table(results, dense))
    if args.json:
        args.json.write_text(json.dumps({"variants": results, "dense": dense}, indent=2) + "\n")


if __name__ == "__main__":
    main()
