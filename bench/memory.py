"""Benchmark: peak memory of the commands that run a model, streamed (the default) vs the whole model.

Target (issue 11): random Qwen3-MoE checkpoints with a real layer shape (hidden 1024, 64 experts of width
512, top-8, bf16 on disk) at 2, 4 and 8 layers; for ``moetool quantize`` (GPTQ 4-bit),
``profile-routing``, ``eval`` and ``merge``:

* peak RSS at 8 layers is at most 1.25x the peak at 2 layers (memory does not grow with depth);
* peak RSS stays below three layers' bf16 bytes + the calibration activations + a fixed overhead.

Each command runs in a fresh process (``bench/peak.py`` wraps the CLI and records the process's peak RSS
with ``getrusage``, and the peak CUDA memory when a GPU is used). The whole-model path (``--whole-model``)
is measured beside it as the baseline. The fixed overhead is measured, not assumed: the peak RSS of
``moetool eval`` on the 4.9M-parameter example over 256 tokens (the process, torch, transformers, the
tokenizer, the dataset, the runner's threads). The activations are computed from the config: every
token position of the pass kept in float32 a few times over, plus one batch inside the MoE block.

Usage::

    python bench/memory.py                         # 2, 4, 8 layers, every command, CPU
    python bench/memory.py --layers 2 8 --commands quantize eval --device cuda
    python bench/memory.py --json > memory.json
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from typing import Any

TRAIN = ROOT / "examples" / "data" / "train.jsonl"
HELDOUT = ROOT / "examples" / "data" / "heldout.jsonl"
CALIBRATION_TOKENS = 4096
EVAL_TOKENS = 8192
SEQ_LEN = 256


def command_args(command: str, model: Path, out: Path, device: str) -> list[str]:
    """The CLI arguments of one measured run."""
    common = ["--device", device]
    if command == "quantize":
        return [
            "quantize", str(model), "-o", str(out), "--method", "gptq", "--bits", "4", "--group-size", "128",
            "-d", str(TRAIN), "--max-tokens", str(CALIBRATION_TOKENS), "--seq-len", str(SEQ_LEN), "--json",
            *common,
        ]  # fmt: skip
    if command == "profile-routing":
        return [
            "profile-routing", str(model), "-d", str(HELDOUT), "--max-tokens", str(EVAL_TOKENS),
            "--seq-len", str(SEQ_LEN), "--json", *common,
        ]  # fmt: skip
    if command == "eval":
        return [
            "eval", str(model), "-d", str(HELDOUT), "--max-tokens", str(EVAL_TOKENS), "--seq-len", str(SEQ_LEN),
            "--json", *common,
        ]  # fmt: skip
    if command == "merge":
        return [
            "merge", str(model), "-o", str(out), "--num-experts", "32", "--method", "frequency",
            "-d", str(TRAIN), "--max-tokens", str(CALIBRATION_TOKENS), "--eval-max-tokens", str(EVAL_TOKENS // 4),
            "--seq-len", str(SEQ_LEN), "--json", *common,
        ]  # fmt: skip
    raise ValueError(command)


def measure(args: list[str]) -> dict[str, Any]:
    """Run ``moetool ARGS`` in a fresh process; its peak RSS (and CUDA peak), wall time and exit code."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        report = Path(handle.name)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    process = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "peak.py"), str(report), *args],
        capture_output=True,
        text=True,
        env=env,
    )
    wall = time.perf_counter() - started
    peak = json.loads(report.read_text()) if report.stat().st_size else {}
    report.unlink()
    if process.returncode != 0:
        tail = (process.stderr or process.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"moetool {' '.join(args[:2])} failed ({process.returncode}): {' | '.join(tail)}")
    return {"wall_s": round(wall, 2), **peak}


def layer_bytes_bf16(model: Path) -> int:
    from moetool.io.checkpoint import Checkpoint
    from moetool.runner.memory import estimate

    return estimate(Checkpoint.open(model), "bfloat16").largest_layer_bytes


def activation_bytes(model: Path, command: str) -> int:
    """The activations a pass holds, in float32: every token position's hidden state a few times over
    (kept, a layer's input and output, the residual: ``ACTIVATION_COPIES``), plus one batch inside the
    MoE block (each token's top-k expert inputs and outputs)."""
    from moetool.runner.memory import ACTIVATION_COPIES

    config = json.loads((model / "config.json").read_text())
    hidden = config["hidden_size"]
    inter = config.get("moe_intermediate_size", config.get("intermediate_size"))
    top_k = config["num_experts_per_tok"]
    tokens = CALIBRATION_TOKENS if command in ("quantize", "merge") else EVAL_TOKENS
    batch = 8 * SEQ_LEN
    return 4 * (ACTIVATION_COPIES * tokens * hidden + batch * top_k * (2 * inter + 2 * hidden))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--commands", nargs="+", default=["quantize", "profile-routing", "eval", "merge"])
    parser.add_argument("--preset", default="qwen3-moe-1024")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-whole", action="store_true", help="skip the whole-model baseline")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the models here (default: a temp dir)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from bench.real_shape import build

    work = args.workdir or Path(tempfile.mkdtemp(prefix="moetool-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    # The fixed overhead: the same kind of process on a model too small to matter (Python, torch,
    # transformers, the tokenizer, the dataset, the runner's threads).
    overhead = measure(
        ["eval", str(ROOT / "examples" / "tiny-moe"), "-d", str(HELDOUT), "--max-tokens", "256", "--json"]
    )["rss_bytes"]
    try:
        for layers in args.layers:
            model = work / f"{args.preset}-{layers}"
            if not (model / "config.json").exists():
                build(model, args.preset, layers)
            layer = layer_bytes_bf16(model)
            for command in args.commands:
                for whole in (False, True) if not args.no_whole else (False,):
                    out = work / f"out-{command}-{layers}-{whole}"
                    shutil.rmtree(out, ignore_errors=True)
                    run_args = command_args(command, model, out, args.device) + (["--whole-model"] if whole else [])
                    figures = measure(run_args)
                    shutil.rmtree(out, ignore_errors=True)
                    rows.append(
                        {
                            "command": command,
                            "layers": layers,
                            "path": "whole" if whole else "streamed",
                            "layer_bf16_bytes": layer,
                            "activation_bytes": activation_bytes(model, command),
                            **figures,
                        }
                    )
                    if not args.json:
                        print(_row(rows[-1]), flush=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    summary = _summary(rows, overhead)
    if args.json:
        print(json.dumps({"overhead_rss_bytes": overhead, "rows": rows, "summary": summary}, indent=2))
    else:
        print(
            f"\nfixed overhead (peak RSS of `moetool eval` on examples/tiny-moe, 256 tokens): {overhead / 1e9:.2f} GB"
        )
        for line in summary:
            print(line)


def _row(row: dict[str, Any]) -> str:
    gpu = f"  GPU {row['cuda_peak_bytes'] / 1e9:.2f} GB" if row.get("cuda_peak_bytes") else ""
    return (
        f"{row['command']:>16} {row['layers']} layers {row['path']:>8}: peak RSS {row['rss_bytes'] / 1e9:6.2f} GB"
        f"{gpu}  ({row['wall_s']:.1f} s)"
    )


def _summary(rows: list[dict[str, Any]], overhead: int) -> list[str]:
    """The two targets per command, streamed path."""
    out = []
    for command in dict.fromkeys(r["command"] for r in rows):
        streamed = {r["layers"]: r for r in rows if r["command"] == command and r["path"] == "streamed"}
        whole = {r["layers"]: r for r in rows if r["command"] == command and r["path"] == "whole"}
        if not streamed:
            continue
        low, high = min(streamed), max(streamed)
        ratio = streamed[high]["rss_bytes"] / streamed[low]["rss_bytes"]
        bound = 3 * streamed[high]["layer_bf16_bytes"] + streamed[high]["activation_bytes"] + overhead
        peak = max(r["rss_bytes"] for r in streamed.values())
        line = (
            f"{command}: streamed peak {streamed[low]['rss_bytes'] / 1e9:.2f} GB at {low} layers -> "
            f"{streamed[high]['rss_bytes'] / 1e9:.2f} GB at {high} ({ratio:.2f}x, target <= 1.25x: "
            f"{'ok' if ratio <= 1.25 else 'MISSED'}); bound 3 layers bf16 + activations + overhead = "
            f"{bound / 1e9:.2f} GB ({'ok' if peak <= bound else 'MISSED'})"
        )
        if high in whole:
            line += f"; whole model at {high} layers: {whole[high]['rss_bytes'] / 1e9:.2f} GB"
        out.append(line)
    return out


if __name__ == "__main__":
    main()
