"""Benchmark: what validating an input costs (issue 14).

Three figures:

* the header checks on a DeepSeek-V3-size checkpoint (46,183 tensors, the real config, synthetic
  headers), in process: what ``inspect`` and every command's preflight add;
* the NaN/Inf scan throughput on a 512 MB float32 and a 256 MB bfloat16 file (page cache warm): what
  a write command's input scan costs per GB;
* ``moetool quantize`` refusing a malformed input (``"hidden_size": 160.0``) as a whole process: it
  must not pay the torch import (5-17 s before issue 14).

Usage::

    python bench/validate.py
"""

from __future__ import annotations

import sys
from pathlib import Path

# bench/inspect.py would shadow the standard library's inspect module: drop bench/ from sys.path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import json
import shutil
import statistics
import subprocess
import tempfile
import time

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "tests" / "data" / "moe-configs" / "deepseek-ai__DeepSeek-V3" / "config.json"
RUNS = 3


def _median(fn) -> float:
    times = []
    for _ in range(RUNS):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def header_checks() -> float:
    from moetool.arch import family_for_config, resolve_dims
    from moetool.arch.plan import planned_tensors
    from moetool.io.checkpoint import Checkpoint
    from moetool.io.safetensors_header import SafetensorsHeader, TensorInfo
    from moetool.validate import validate_checkpoint

    config = json.loads(CONFIG.read_text())
    config.pop("quantization_config", None)
    spec = family_for_config(config)
    tensors, offset = {}, 0
    for planned in planned_tensors(spec, resolve_dims(spec, config)):
        size = 2
        for dim in planned.shape:
            size *= dim
        tensors[planned.name] = TensorInfo(planned.name, "BF16", planned.shape, "x", offset, offset + size)
        offset += size
    header = SafetensorsHeader("x", tensors, {}, 0, None)
    checkpoint = Checkpoint.from_headers(name="deepseek-v3", config=config, headers=[header])
    assert validate_checkpoint(checkpoint) == []
    return _median(lambda: validate_checkpoint(checkpoint))


def scan_throughput(folder: Path) -> dict[str, float]:
    import numpy as np
    from safetensors.numpy import save_file

    import moetool.io.nonfinite as nonfinite

    rng = np.random.default_rng(0)
    f32 = {f"t{i}": rng.standard_normal((4096, 4096), dtype=np.float32) for i in range(8)}
    save_file(f32, str(folder / "f32.safetensors"))
    bf16 = {k: (v.view(np.uint32) >> 16).astype(np.uint16) for k, v in f32.items()}
    save_file(bf16, str(folder / "bf16.safetensors"))
    # numpy has no bfloat16: relabel the uint16 tensors in the header (same bytes).
    raw = (folder / "bf16.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = raw[8 : 8 + n].rstrip(b" ").replace(b'"U16"', b'"BF16"')
    header += b" " * (-len(header) % 8)
    (folder / "bf16.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + raw[8 + n :])
    out = {}
    for name in ("f32", "bf16"):
        path = folder / f"{name}.safetensors"
        size = path.stat().st_size

        def scan(path: Path = path) -> None:
            nonfinite._MEMO.clear()
            assert nonfinite.scan_file(path) == []

        scan(path)  # page cache warm
        out[name] = size / 1e9 / _median(scan)
    return out


def quantize_refusal(folder: Path) -> tuple[float, str]:
    model = folder / "bad"
    shutil.copytree(ROOT / "examples" / "tiny-moe", model)
    config = json.loads((model / "config.json").read_text())
    config["hidden_size"] = 160.0
    (model / "config.json").write_text(json.dumps(config))
    command = [sys.executable, "-m", "moetool", "quantize", str(model), "-o", str(folder / "q"), "--method", "rtn"]
    last = ""

    def run() -> None:
        nonlocal last
        result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 1, result.stderr
        last = result.stderr.strip().splitlines()[-1]

    return _median(run), last


def main() -> None:
    print(f"header checks, DeepSeek-V3 size (46,183 tensors): {header_checks():.2f} s (median of {RUNS})")
    with tempfile.TemporaryDirectory() as tmp:
        rates = scan_throughput(Path(tmp))
        print(f"NaN/Inf scan: float32 {rates['f32']:.2f} GB/s, bfloat16 {rates['bf16']:.2f} GB/s (page cache warm)")
        seconds, line = quantize_refusal(Path(tmp))
        print(f"quantize refusing hidden_size 160.0, whole process: {seconds:.2f} s (before issue 14: 5-17 s)")
        print(f"  {line[:160]}")


if __name__ == "__main__":
    main()
