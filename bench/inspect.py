"""Benchmark: ``moetool inspect`` against the usual alternative, on full-size checkpoints.

The usual way to count a checkpoint's parameters without loading it is to build the transformers
model on the meta device and call ``num_parameters()`` (GUIDE.md section 2: 7.4 s here). This script
times both as whole processes, the way a user runs them, on the real configs of Mixtral-8x7B and
DeepSeek-V3 with full-size *sparse* safetensors shards: real headers (names, dtypes, shapes, offsets
exactly as the Hub checkpoints have them), data sections that are holes on disk. inspect reads only
the headers, so it sees exactly what it would on the real 93 GB / 1.3 TB downloads.

Usage::

    python bench/inspect.py            # both models, 5 runs each
    python bench/inspect.py --runs 3 --models mixtral
"""

from __future__ import annotations

import sys
from pathlib import Path

# Running `python bench/X.py` puts bench/ first on sys.path, where bench/inspect.py would shadow the
# standard library's inspect module (which torch and dataclasses import): drop it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import argparse
import json
import statistics
import struct
import subprocess
import tempfile
import time

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "tests" / "data" / "moe-configs"
MODELS = {
    "mixtral": "mistralai__Mixtral-8x7B-v0.1",
    "deepseek-v3": "deepseek-ai__DeepSeek-V3",
}
SHARD_BYTES = 5 * 10**9

META_BASELINE = """
import sys, json, torch
from transformers import AutoConfig, AutoModelForCausalLM
config = AutoConfig.from_pretrained(sys.argv[1])
with torch.device("meta"):
    model = AutoModelForCausalLM.from_config(config)
print(model.num_parameters())
"""


def write_sparse_checkpoint(folder: Path, config_dir: Path) -> int:
    """Write config.json and full-size sparse BF16 shards with the tensors the config implies."""
    from moetool.arch.dims import resolve_dims
    from moetool.arch.plan import planned_tensors
    from moetool.arch.registry import family_for_config

    config = json.loads((config_dir / "config.json").read_text())
    config.pop("quantization_config", None)  # bench the plain BF16 layout
    (folder / "config.json").write_text(json.dumps(config))
    spec = family_for_config(config)
    tensors = [(t.name, t.shape) for t in planned_tensors(spec, resolve_dims(spec, config))]

    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = 2 * _numel(shape)
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    weight_map: dict[str, str] = {}
    total = 0
    for index, shard in enumerate(shards, start=1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape in shard:
            nbytes = 2 * _numel(shape)
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = file
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / file, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)) + raw)
            fh.truncate(8 + len(raw) + offset)  # a hole: no disk space used
        total += offset
    index_doc = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_doc))
    return len(tensors)


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for dim in shape:
        out *= dim
    return out


def time_process(argv: list[str], runs: int) -> tuple[float, str]:
    """Median wall time of a command over ``runs`` runs, and its last stdout."""
    times = []
    out = ""
    for _ in range(runs):
        start = time.perf_counter()
        result = subprocess.run(argv, capture_output=True, text=True, check=True)
        times.append(time.perf_counter() - start)
        out = result.stdout
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--baseline-runs", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.models:
            folder = Path(tmp) / key
            folder.mkdir()
            num_tensors = write_sparse_checkpoint(folder, CONFIGS / MODELS[key])
            inspect_cmd = [sys.executable, "-m", "moetool", "inspect", str(folder), "--json"]
            ours, out = time_process(inspect_cmd, args.runs)
            doc = json.loads(out)
            config_only, _ = time_process([*inspect_cmd, "--config-only"], args.runs)
            base, base_out = time_process([sys.executable, "-c", META_BASELINE, str(folder)], args.baseline_runs)
            rows.append((key, num_tensors, ours, config_only, base, doc, int(base_out.strip())))

    header = ("model", "tensors", "inspect", "--config-only", "meta+num_parameters", "speed-up")
    print(f"{header[0]:<12} {header[1]:>8} {header[2]:>9} {header[3]:>14} {header[4]:>20} {header[5]:>9}")
    for key, num_tensors, ours, config_only, base, _, _ in rows:
        print(f"{key:<12} {num_tensors:>8} {ours:>8.2f}s {config_only:>13.2f}s {base:>19.2f}s {base / ours:>8.1f}x")
    print()
    print(f"{'model':<12} {'moetool total':>16} {'moetool active':>16} {'transformers num_parameters':>28}")
    for key, _, _, _, _, doc, base_count in rows:
        print(f"{key:<12} {doc['total_params']:>16,} {doc['active_params']:>16,} {base_count:>28,}")
    print("\ntarget: inspect of a local checkpoint under 0.5 s as a whole process; baseline measured here")


if __name__ == "__main__":
    main()
