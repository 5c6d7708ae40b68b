"""Benchmark: the cost of profiling routing, against a plain forward pass over the same batches.

Targets (issues 3 and 15): profiling costs at most 5% more wall time than a plain forward over the
same tokens, on the CPU at 128 experts and on the example, and on a GPU at Qwen3-30B-A3B's layer
shape in bfloat16; peak memory is flat from 10k to 200k tokens.

Shapes (``--shapes``): ``example`` is ``examples/tiny-moe`` on ``examples/data/train.jsonl``; the
others are random models built in the bench with a real model's layer shape, fewer layers and a small
vocabulary, run on random token ids:

* ``qwen3-30b-a3b``: hidden 2048, 128 experts of width 768, top-8 (Qwen3-30B-A3B's layers);
* ``mixtral-8x7b``: hidden 4096, 8 experts of width 14336, top-2 (Mixtral-8x7B's layers);
* ``fine-256``: hidden 1024, 256 experts of width 256, top-8 (a fine-grained router at 256 experts).

Each shape runs in a fresh process, so peak memory (RSS, or the GPU's peak allocation) is its own.
Within a run the plain forward and the profiled forward see the same batches, alternately, after a
warm-up of each; the times are the medians of ``--repeats``, the overhead the median over the repeats
of each profiled pass against the plain pass just before it (GPU timings synchronise the device). On
the CPU the overhead in CPU time of the process is shown too: on a shared machine it is steadier. The
``ops/update`` column is the number of kernel-running aten operations one ``LayerAccumulator.update``
issues at the shape's router size and batch (torch's profiler, on the CPU), with the count of
operations that would make a GPU wait for the host (boolean-mask indexing, ``nonzero``, ``item``,
``bincount``...), which must be 0.

Usage::

    python bench/profile_routing.py                                  # CPU: example, qwen3-30b-a3b, fine-256
    python bench/profile_routing.py --device cuda                    # GPU: + mixtral-8x7b, bfloat16, more layers
    python bench/profile_routing.py --shapes example --tokens 10000 200000   # memory flat in the token count
    python bench/profile_routing.py --updates                        # one update, this vs the previous code
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
import resource
import statistics
import subprocess
import time

# name -> (config class, config fields). Layers, dtype and batch shape come from the device defaults.
SHAPES: dict[str, tuple[str, dict]] = {
    "qwen3-30b-a3b": (
        "Qwen3MoeConfig",
        {
            "hidden_size": 2048,
            "intermediate_size": 6144,
            "moe_intermediate_size": 768,
            "num_attention_heads": 32,
            "num_key_value_heads": 4,
            "head_dim": 128,
            "num_experts": 128,
            "num_experts_per_tok": 8,
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        },
    ),
    "mixtral-8x7b": (
        "MixtralConfig",
        {
            "hidden_size": 4096,
            "intermediate_size": 14336,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "num_local_experts": 8,
            "num_experts_per_tok": 2,
        },
    ),
    "fine-256": (
        "Qwen3MoeConfig",
        {
            "hidden_size": 1024,
            "intermediate_size": 3072,
            "moe_intermediate_size": 256,
            "num_attention_heads": 16,
            "num_key_value_heads": 4,
            "head_dim": 64,
            "num_experts": 256,
            "num_experts_per_tok": 8,
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
        },
    ),
}

#: Per device: default shapes, layers of the random models, dtype, windows per batch, tokens per window,
#: batches per pass (random shapes; the example reads --tokens of its data instead).
DEFAULTS = {
    "cpu": {"shapes": ["example", "qwen3-30b-a3b", "fine-256"], "layers": 2, "dtype": "float32", "batch": (4, 256)},
    "cuda": {
        "shapes": ["example", "qwen3-30b-a3b", "mixtral-8x7b", "fine-256"],
        "layers": 8,
        "dtype": "bfloat16",
        "batch": (8, 1024),
    },
}
LAYERS = {"cuda": {"mixtral-8x7b": 4}}


def update_ops(num_experts: int, top_k: int, rows: int, length: int) -> tuple[int, int]:
    """(kernel-running ops, sync-prone ops) in one LayerAccumulator.update, profiled on the CPU."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from moetool.routing.accumulate import BatchContext, LayerAccumulator
    from moetool.routing.ops import kernel_ops, sync_ops

    n = rows * length
    logits = torch.randn(n, num_experts)
    indices = logits.topk(top_k, dim=-1).indices
    mask = torch.ones(n, dtype=torch.bool)
    mask[-length // 3 :] = False
    windows = torch.arange(rows).repeat_interleave(length)
    ctx = BatchContext(mask, windows, torch.zeros(n, dtype=torch.long), rows, tokens=int(mask.sum()))
    acc = LayerAccumulator(num_experts, 1, "cpu")
    acc.update(logits, indices, ctx)  # the batch's first layer derives the shared per-batch tensors
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        acc.update(logits, indices, ctx)
    events = prof.events()
    return len(kernel_ops(events)), len(sync_ops(events))


def update_cost(num_experts: int, top_k: int, rows: int, length: int, rounds: int = 15, calls: int = 20) -> dict:
    """CPU time of one accumulator update, this implementation against the previous one (the oracle kept in
    tests/test_routing_accumulate.py), interleaved, median of ``rounds`` x ``calls``; one thread."""
    import torch

    from moetool.routing.accumulate import LayerAccumulator
    from tests.test_routing_accumulate import ReferenceAccumulator, random_batch

    logits, indices, ctx = random_batch(torch.Generator().manual_seed(0), num_experts, top_k, rows, length, 3)
    accumulators = {"new": LayerAccumulator(num_experts, 3, "cpu"), "previous": ReferenceAccumulator(num_experts, 3)}
    times: dict[str, list[float]] = {name: [] for name in accumulators}
    for acc in accumulators.values():
        acc.update(logits, indices, ctx)
    for _ in range(rounds):
        for name, acc in accumulators.items():
            start = time.process_time()
            for _ in range(calls):
                acc.update(logits, indices, ctx)
            times[name].append((time.process_time() - start) / calls)
    return {name: statistics.median(values) for name, values in times.items()}


def build(shape: str, device: str, dtype: str, layers: int):
    """A random model with the shape's layers (seeded), in eval mode on ``device``."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    cls_name, fields = SHAPES[shape]
    config = getattr(transformers, cls_name)(
        vocab_size=4096, num_hidden_layers=layers, max_position_embeddings=4096, tie_word_embeddings=False, **fields
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    return model.eval()


def run_one(args: argparse.Namespace, shape: str, tokens: int) -> dict:
    """One shape (and token budget): time plain vs profiled forward; report peak memory of this process."""
    import torch

    from moetool.data import Batch, iter_batches, iter_windows, load_documents
    from moetool.modeling import load_model_and_tokenizer
    from moetool.routing.profile import profile_routing
    from moetool.threads import apply_threads

    device = args.device
    defaults = DEFAULTS["cuda" if device.startswith("cuda") else "cpu"]
    threads = apply_threads(args.threads).threads
    dtype = args.dtype or defaults["dtype"]
    rows, length = defaults["batch"] if args.batch_size is None else (args.batch_size, args.seq_len)
    if shape == "example":
        model, tokenizer, _ = load_model_and_tokenizer(str(ROOT / "examples" / "tiny-moe"), device=device, dtype=dtype)
        documents = load_documents(str(ROOT / "examples" / "data" / "train.jsonl"), domain_field="domain")
        domains = sorted({d.domain for d in documents if d.domain})
        windows = iter_windows(tokenizer, documents, seq_len=args.seq_len, max_tokens=tokens)
        batches = list(iter_batches(windows, batch_size=args.batch_size or 8, pad_id=tokenizer.pad_token_id or 0))
        layers = model.config.num_hidden_layers
    else:
        layers = args.layers or LAYERS.get("cuda" if device.startswith("cuda") else "cpu", {}).get(
            shape, defaults["layers"]
        )
        model = build(shape, device, dtype, layers)
        gen = torch.Generator().manual_seed(1)
        count = max(1, tokens // (rows * length))
        batches = [
            Batch(
                input_ids=torch.randint(0, 4096, (rows, length), generator=gen),
                attention_mask=torch.ones(rows, length, dtype=torch.long),
                domains=[None] * rows,
            )
            for _ in range(count)
        ]
        domains = []
    cuda = device.startswith("cuda")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def timed(run) -> tuple[float, float]:
        """(wall seconds, CPU seconds of this process) of one pass."""
        sync()
        start, cpu = time.perf_counter(), time.process_time()
        run()
        sync()
        return time.perf_counter() - start, time.process_time() - cpu

    def plain() -> None:
        with torch.inference_mode():
            for batch in batches:
                ids = batch.input_ids.to(device)
                mask = batch.attention_mask.to(device)
                model(input_ids=ids, attention_mask=mask, use_cache=False)

    def profiled() -> None:
        profile_routing(model, batches, domains=domains)

    timed(plain), timed(profiled)  # warm-up (allocator, kernels)
    plain_times, profiled_times = [], []
    for _ in range(args.repeats):
        plain_times.append(timed(plain))
        profiled_times.append(timed(profiled))
    config = model.config
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", 0)
    top_k = config.num_experts_per_tok
    ops, syncs = update_ops(experts, top_k, batches[0].input_ids.shape[0], batches[0].input_ids.shape[1])
    return {
        "shape": shape,
        "device": device,
        "dtype": dtype,
        "threads": threads,
        "layers": layers,
        "experts": experts,
        "top_k": top_k,
        "tokens": int(sum(int(b.attention_mask.sum()) for b in batches)),
        "batch": list(batches[0].input_ids.shape),
        "plain_s": statistics.median(t[0] for t in plain_times),
        "profiled_s": statistics.median(t[0] for t in profiled_times),
        "plain_cpu_s": statistics.median(t[1] for t in plain_times),
        "profiled_cpu_s": statistics.median(t[1] for t in profiled_times),
        # Each profiled pass against the plain pass just before it (the same moment of a shared machine).
        "overhead": statistics.median(q[0] / p[0] - 1 for p, q in zip(plain_times, profiled_times, strict=True)),
        "overhead_cpu": statistics.median(q[1] / p[1] - 1 for p, q in zip(plain_times, profiled_times, strict=True)),
        "plain_all": plain_times,
        "profiled_all": profiled_times,
        "ops_per_update": ops,
        "sync_ops_per_update": syncs,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    parser.add_argument("--shapes", nargs="+", choices=["example", *SHAPES], help="default: per device")
    parser.add_argument(
        "--tokens",
        type=int,
        nargs="+",
        default=None,
        help="tokens per pass (default: 65536 on a GPU; on the CPU 10000 for the example, 2048 for the random shapes)",
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=None, help="layers of the random models (default: per device)")
    parser.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on GPU")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per window")
    parser.add_argument("--batch-size", type=int, default=None, help="windows per batch (default: per device)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (0: the idle cores, as the commands)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument(
        "--updates",
        action="store_true",
        help="only time one accumulator update (CPU time, one thread) against the previous implementation",
    )
    parser.add_argument("--child", nargs=2, metavar=("SHAPE", "TOKENS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    if args.updates:
        import torch

        torch.set_num_threads(1)
        print(f"{'experts/top-k':>13} {'tokens':>7} {'this':>9} {'previous':>9}  (CPU time per update)")
        for experts, top_k, rows in ((8, 2, 8), (128, 8, 4), (256, 8, 4)):
            cost = update_cost(experts, top_k, rows, args.seq_len)
            tokens = rows * args.seq_len
            print(f"{experts:>9}/{top_k:<3} {tokens:>7} {cost['new'] * 1e3:>7.2f}ms {cost['previous'] * 1e3:>7.2f}ms")
        return

    if args.child:
        print(json.dumps(run_one(args, args.child[0], int(args.child[1]))))
        return

    shapes = args.shapes or DEFAULTS["cuda" if cuda else "cpu"]["shapes"]
    rows = []
    for shape in shapes:
        for tokens in args.tokens or [65536 if cuda else (10_000 if shape == "example" else 2048)]:
            cmd = [sys.executable, __file__, "--child", shape, str(tokens), *_passthrough(args)]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode != 0:
                print(f"{shape}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            row = json.loads(done.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(_line(row), file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    print(_header())
    for row in rows:
        print(_line(row))
    print("\ntargets: overhead <= 5% (CPU at 128 experts and the example; GPU at qwen3-30b-a3b, bfloat16);")
    print("         0 sync ops per update; peak memory flat from the smallest to the largest token budget")


def _passthrough(args: argparse.Namespace) -> list[str]:
    out = ["--device", args.device, "--repeats", str(args.repeats), "--seq-len", str(args.seq_len)]
    out += ["--threads", str(args.threads)]
    for flag, value in (("--layers", args.layers), ("--dtype", args.dtype), ("--batch-size", args.batch_size)):
        if value is not None:
            out += [flag, str(value)]
    return out


def _header() -> str:
    return (
        f"{'shape':<14} {'E/top-k':>8} {'layers':>6} {'dtype':>9} {'thr':>3} {'tokens':>8} {'plain':>9} "
        f"{'profiled':>9} {'overhead':>8} {'CPU-time':>8} {'ops/update':>10} {'syncs':>5} {'peak mem':>10}"
    )


def _line(row: dict) -> str:
    overhead = row["overhead"]
    # CPU time of the process: on a shared machine, less noisy than wall time (on a GPU, not the cost).
    cpu = "-" if row["device"].startswith("cuda") else f"{row['overhead_cpu']:.1%}"
    memory = row["peak_gpu_mb"] if row["peak_gpu_mb"] is not None else row["peak_rss_mb"]
    return (
        f"{row['shape']:<14} {row['experts']:>4}/{row['top_k']:<3} {row['layers']:>6} {row['dtype']:>9} "
        f"{row['threads']:>3} {row['tokens']:>8,} {row['plain_s']:>8.2f}s {row['profiled_s']:>8.2f}s "
        f"{overhead:>8.1%} {cpu:>8} {row['ops_per_update']:>10} {row['sync_ops_per_update']:>5} {memory:>8.0f}MB"
    )


if __name__ == "__main__":
    main()
