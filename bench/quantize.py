"""Benchmark: GPTQ time per MoE layer, all experts batched vs one expert at a time, on CPU and CUDA.

Target (issue 7): on a GPU the batched path (every expert of a layer in one ``gptq_quantize`` call over
``[E, rows, columns]``) is at least 5x faster than quantizing the experts one by one with the very same
function (``E = 1`` slices). On the CPU the same code runs; the table shows what batching buys there.

A "layer" is what ``moetool quantize`` runs GPTQ on for one MoE layer: ``gate_up [E, 2I, H]`` with
Hessians ``[E, H, H]`` and ``down [E, H, I]`` with Hessians ``[E, I, I]``. Weights and Hessians are
synthetic (seeded; Hessians are ``B B^T`` of random low-rank-plus-diagonal factors, like real
activations), so no checkpoint is needed: only this repository and torch. Shapes are those of real
models (``--presets``). Each timing is the median of ``--repeats`` runs after one warm-up; CUDA
timings synchronise the device. Both paths must give the same codes (checked and reported).

With ``--end-to-end`` it also quantizes ``examples/tiny-moe`` through ``moetool.quantize`` (calibration
included; needs transformers) and reports the per-layer wall time of the real pipeline.

Usage::

    python bench/quantize.py                                    # CPU (and CUDA when available), default presets
    python bench/quantize.py --devices cuda --presets qwen3-30b-a3b mixtral-8x7b
    python bench/quantize.py --devices cpu --presets tiny-moe --end-to-end --json
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
import statistics
import time

# name -> (experts E, hidden H, expert intermediate I): one MoE layer of a real model.
PRESETS: dict[str, tuple[int, int, int]] = {
    "tiny-moe": (8, 160, 256),  # examples/tiny-moe
    "small-fine-grained": (64, 512, 256),
    "olmoe-1b-7b": (64, 2048, 1024),
    "qwen3-30b-a3b": (128, 2048, 768),
    "mixtral-8x7b": (8, 4096, 14336),
}
DEFAULT_PRESETS = {
    "cpu": ["tiny-moe", "small-fine-grained"],
    "cuda": ["tiny-moe", "small-fine-grained", "qwen3-30b-a3b", "olmoe-1b-7b", "mixtral-8x7b"],
}


def synthetic_layer(experts: int, hidden: int, inter: int, device, seed: int = 0):
    """Weights and Hessians of one MoE layer, on ``device``."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(seed)

    def hessian(columns: int):
        rank = max(8, columns // 8)
        factor = torch.randn(experts, columns, rank, generator=gen).to(device)
        diag = torch.rand(experts, columns, generator=gen).to(device) * 0.1
        return torch.bmm(factor, factor.transpose(1, 2)) / rank + torch.diag_embed(diag)

    gate_up = (torch.randn(experts, 2 * inter, hidden, generator=gen) * 0.02).to(device)
    down = (torch.randn(experts, hidden, inter, generator=gen) * 0.02).to(device)
    return (gate_up, hessian(hidden)), (down, hessian(inter))


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_layer(layer, grid, group_size: int, act_order: bool, device, repeats: int) -> dict:
    """Median seconds for the layer, batched and one expert at a time, and whether the codes agree."""
    from moetool.quantize.gptq import gptq_quantize

    def batched():
        return [gptq_quantize(w, h, grid, group_size, act_order=act_order) for w, h in layer]

    def one_by_one():
        out = []
        for w, h in layer:
            out.append(
                [
                    gptq_quantize(w[e : e + 1], h[e : e + 1], grid, group_size, act_order=act_order)
                    for e in range(w.shape[0])
                ]
            )
        return out

    timings = {}
    results = {}
    for name, fn in (("batched", batched), ("one_by_one", one_by_one)):
        fn()  # warm-up (kernels, allocator)
        _sync(device)
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            results[name] = fn()
            _sync(device)
            samples.append(time.perf_counter() - start)
        timings[name] = statistics.median(samples)
    same = 0
    total = 0
    max_diff = 0.0
    for whole, parts in zip(results["batched"], results["one_by_one"], strict=True):
        for e, part in enumerate(parts):
            total += part.codes.numel()
            same += int((part.codes[0] == whole.codes[e]).sum())
            max_diff = max(max_diff, float((part.dequantized[0] - whole.dequantized[e]).abs().max()))
    return {
        "batched_s": timings["batched"],
        "one_by_one_s": timings["one_by_one"],
        "speedup": timings["one_by_one"] / timings["batched"],
        "same_codes": same / total,
        "max_abs_diff": max_diff,
    }


def end_to_end(device: str) -> dict:
    """Quantize examples/tiny-moe with GPTQ through the library; per-layer wall times."""
    import tempfile

    from moetool.data import DatasetSpec
    from moetool.quantize import QuantizeOptions, quantize

    with tempfile.TemporaryDirectory() as tmp:
        result = quantize(
            ROOT / "examples" / "tiny-moe",
            Path(tmp) / "out",
            QuantizeOptions(bits=4, group_size=64, device=device),
            calibration=DatasetSpec(str(ROOT / "examples" / "data" / "train.jsonl"), max_tokens=65536, seq_len=256),
            verify=False,
        )
    return {
        "device": device,
        "layer_seconds": [round(layer.seconds, 3) for layer in result.layers],
        "timings": {k: round(v, 3) for k, v in result.timings.items()},
    }


def main() -> None:
    import torch

    from moetool.quantize.grids import UniformGrid

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--devices", nargs="+", default=None, help="cpu and/or cuda (default: cpu, plus cuda if available)"
    )
    parser.add_argument("--presets", nargs="+", default=None, choices=sorted(PRESETS), help="layer shapes to time")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True, help="as moetool's default")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--end-to-end", action="store_true", help="also time moetool.quantize on examples/tiny-moe")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    if "cuda" in devices and not torch.cuda.is_available():
        parser.error("--devices cuda: no CUDA device here")
    grid = UniformGrid(args.bits)
    rows = []
    for name in devices:
        device = torch.device(name)
        label = (
            torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
        )
        for preset in args.presets or DEFAULT_PRESETS[device.type]:
            e, h, i = PRESETS[preset]
            layer = synthetic_layer(e, h, i, device)
            figures = time_layer(layer, grid, args.group_size, args.act_order, device, args.repeats)
            rows.append(
                {
                    "device": name,
                    "device_name": label,
                    "preset": preset,
                    "experts": e,
                    "hidden": h,
                    "intermediate": i,
                    **figures,
                }
            )
            if not args.json:
                took = f"batched {figures['batched_s']:.3f}s, one by one {figures['one_by_one_s']:.3f}s"
                print(f"  {name} {preset}: {took}", file=sys.stderr)
            del layer
            if device.type == "cuda":
                torch.cuda.empty_cache()
    doc = {
        "torch": torch.__version__,
        "bits": args.bits,
        "group_size": args.group_size,
        "act_order": args.act_order,
        "repeats": args.repeats,
        "layers": rows,
    }
    if args.end_to_end:
        doc["end_to_end"] = [end_to_end(name) for name in devices]
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    setting = f"w{args.bits} g{args.group_size}{' act-order' if args.act_order else ''}"
    print(f"GPTQ per MoE layer (gate_up + down), {setting}, median of {args.repeats}; torch {torch.__version__}")
    print("| device | layer (E x H x I) | batched | one by one | speedup | same codes |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        shape = f"{row['preset']} ({row['experts']} x {row['hidden']} x {row['intermediate']})"
        times = f"{row['batched_s']:.3f} s | {row['one_by_one_s']:.3f} s | {row['speedup']:.1f}x"
        print(f"| {row['device_name']} | {shape} | {times} | {100 * row['same_codes']:.2f}% |")
    for run in doc.get("end_to_end", []):
        print(f"end to end, examples/tiny-moe on {run['device']}: per layer {run['layer_seconds']} s; {run['timings']}")


if __name__ == "__main__":
    main()
