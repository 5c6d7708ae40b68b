"""Several processes (torchrun / accelerate launch, gloo on CPU): each runs a share, results are summed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tiny-moe"
HELDOUT = ROOT / "examples" / "data" / "heldout.jsonl"
TRAIN = ROOT / "examples" / "data" / "train.jsonl"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _moetool(*args: str, processes: int = 1) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    if processes == 1:
        command = [sys.executable, "-m", "moetool", *args]
    else:
        command = [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "moetool", *args,
        ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    # Only the first process prints: one JSON document.
    return json.loads(result.stdout)


def test_profile_routing_two_processes_same_counts() -> None:
    args = ("profile-routing", str(EXAMPLE), "-d", str(HELDOUT), "--max-tokens", "4000", "--json")
    one = _moetool(*args)
    two = _moetool(*args, processes=2)
    assert one["tokens"] == two["tokens"] == 4000
    for a, b in zip(one["layers"], two["layers"], strict=True):
        assert a["counts"] == b["counts"]
        assert a["dropped"] == b["dropped"]
        assert a["aux_loss"] == pytest.approx(b["aux_loss"], rel=1e-9)


@pytest.mark.slow
def test_eval_and_quantize_two_processes(tmp_path: Path) -> None:
    args = ("eval", str(EXAMPLE), "-d", str(HELDOUT), "--max-tokens", "4000", "--reference", str(EXAMPLE), "--json")
    one, two = _moetool(*args), _moetool(*args, processes=2)
    assert one["tokens"] == two["tokens"]
    assert one["perplexity"] == pytest.approx(two["perplexity"], rel=1e-9)
    quantize = ("quantize", str(EXAMPLE), "--bits", "4", "--group-size", "64", "-d", str(TRAIN), "--max-tokens", "4096")
    single = _moetool(*quantize, "-o", str(tmp_path / "one"), "--json")
    double = _moetool(*quantize, "-o", str(tmp_path / "two"), "--json", processes=2)
    assert double["calibration"]["processes"] == 2
    assert double["calibration"]["tokens"] == single["calibration"]["tokens"]
    assert all(check["passed"] is not False for check in double["verification"]["checks"])
    # Hessians summed across processes add in another order: codes may differ, quality does not.
    evals = [
        _moetool("eval", str(tmp_path / name), "-d", str(HELDOUT), "--max-tokens", "4000", "--json")
        for name in ("one", "two")
    ]
    assert evals[0]["perplexity"] == pytest.approx(evals[1]["perplexity"], rel=0.01)
