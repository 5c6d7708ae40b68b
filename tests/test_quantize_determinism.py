"""GPTQ gives the same bytes whatever the CPU thread count (moetool.quantize.gptq.reproducible_threads).

The model has the example's widths (hidden 160, expert width 256) and two layers: at that size MKL's
Cholesky, triangular inverse and skinny GEMMs round differently on 2 threads than on 1, and without the
fixed thread count 16 of this model's 89 tensors differed between the two runs when the test was
written (``MOETOOL_GPTQ_THREADS=0``, on the project's 2-core machine).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from moetool.quantize import CalibrationData, QuantizeOptions, quantize
from tests.test_data import make_tokenizer
from tests.test_eval import corpus
from tests.tiny import build_tiny

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")


def tensor_bytes(folder: Path) -> dict[str, bytes]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                out[name] = handle.get_tensor(name).contiguous().view(torch.uint8).numpy().tobytes()
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quantize-determinism")
    shape = {"hidden_size": 160, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4}
    build_tiny("mixtral", root / "moe", **shape)
    make_tokenizer(path=root / "moe")
    data = root / "calib.jsonl"
    data.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in corpus(200)), encoding="utf-8")
    return {"moe": root / "moe", "data": data, "root": root}


def run(setup, threads: int, name: str) -> dict[str, bytes]:
    out = setup["root"] / name
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        quantize(
            str(setup["moe"]),
            str(out),
            QuantizeOptions(bits=4, group_size=32, device="cpu"),
            calibration=CalibrationData(dataset=str(setup["data"]), max_tokens=2048, seq_len=64),
            verify=False,
        )
    finally:
        torch.set_num_threads(before)
    return tensor_bytes(out)


def test_gptq_bytes_do_not_depend_on_the_thread_count(setup, monkeypatch):
    monkeypatch.delenv("MOETOOL_GPTQ_THREADS", raising=False)
    one = run(setup, 1, "one-thread")
    two = run(setup, 2, "two-threads")
    assert one.keys() == two.keys()
    differ = [name for name in one if one[name] != two[name]]
    assert not differ, f"{len(differ)} of {len(one)} tensors differ, e.g. {differ[:3]}"


@pytest.mark.parametrize(("value", "expected"), [("", 1), ("0", 0), ("4", 4), ("x", 1), ("-3", 0)])
def test_gptq_threads_override(monkeypatch, value, expected):
    from moetool.quantize.gptq import gptq_cpu_threads

    monkeypatch.setenv("MOETOOL_GPTQ_THREADS", value)
    assert gptq_cpu_threads() == expected
