"""Benchmark: the cost of profiling routing, against a plain forward pass over the same tokens.

Targets (issue 3): profiling costs at most 15% more wall time than a plain forward over the same
tokens, and its peak memory is flat from 10k to 200k tokens.

Each token budget runs in a fresh process so peak RSS (ru_maxrss) is that run's own. Within a run,
the plain forward and the profiled forward see the same batches, in alternating order, after a
warm-up, and the median of the repetitions is reported.

Usage::

    python bench/profile_routing.py                      # examples/tiny-moe on examples/data/train.jsonl
    python bench/profile_routing.py --tokens 10000 200000 --repeats 3
"""

from __future__ import annotations

import sys
from pathlib import Path

# Running `python bench/X.py` puts bench/ first on sys.path, where bench/inspect.py would shadow the
# standard library's inspect module (which torch and dataclasses import): drop it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import resource
import statistics
import subprocess
import time

ROOT = Path(__file__).resolve().parents[1]


def run_one(model_path: str, dataset: str, tokens: int, repeats: int, seq_len: int, batch_size: int) -> dict:
    """One token budget: time plain vs profiled forward; report peak RSS of this process."""
    import torch

    from moetool.data import iter_batches, iter_windows, load_documents
    from moetool.modeling import load_model
    from moetool.routing.profile import profile_routing

    torch.set_num_threads(2)
    model, tokenizer, _ = load_model(model_path, device="cpu", dtype="float32")
    documents = load_documents(dataset, domain_field="domain")
    domains = sorted({d.domain for d in documents if d.domain})
    pad = tokenizer.pad_token_id or 0

    def batches():
        windows = iter_windows(tokenizer, documents, seq_len=seq_len, max_tokens=tokens)
        return iter_batches(windows, batch_size=batch_size, pad_id=pad)

    def plain() -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            for batch in batches():
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        return time.perf_counter() - start

    def profiled() -> float:
        start = time.perf_counter()
        profile_routing(model, batches(), domains=domains)
        return time.perf_counter() - start

    plain(), profiled()  # warm-up (allocator, kernels)
    plain_times, profiled_times = [], []
    for _ in range(repeats):
        plain_times.append(plain())
        profiled_times.append(profiled())
    return {
        "tokens": tokens,
        "plain_s": statistics.median(plain_times),
        "profiled_s": statistics.median(profiled_times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "examples" / "tiny-moe"))
    parser.add_argument("--dataset", default=str(ROOT / "examples" / "data" / "train.jsonl"))
    parser.add_argument("--tokens", type=int, nargs="+", default=[10_000, 50_000, 200_000])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        result = run_one(args.model, args.dataset, args.tokens[0], args.repeats, args.seq_len, args.batch_size)
        print(json.dumps(result))
        return

    rows = []
    for tokens in args.tokens:
        cmd = [
            sys.executable,
            __file__,
            "--child",
            "--model",
            args.model,
            "--dataset",
            args.dataset,
            "--tokens",
            str(tokens),
            "--repeats",
            str(args.repeats),
            "--seq-len",
            str(args.seq_len),
            "--batch-size",
            str(args.batch_size),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))

    print(f"{'tokens':>9} {'plain forward':>14} {'profile-routing':>16} {'overhead':>9} {'peak RSS':>10}")
    for row in rows:
        overhead = row["profiled_s"] / row["plain_s"] - 1
        print(
            f"{row['tokens']:>9,} {row['plain_s']:>13.2f}s {row['profiled_s']:>15.2f}s {overhead:>8.1%} "
            f"{row['peak_rss_mb']:>8.0f}MB"
        )
    print("\ntargets: overhead <= 15%; peak RSS flat from the smallest to the largest token budget")


if __name__ == "__main__":
    main()
