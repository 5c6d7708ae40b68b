"""The CLI contract of ``moetool quantize``, and quantized checkpoints through ``moetool eval``,
``profile-routing`` and ``inspect``: --json documents, tables, exit codes, one-line errors, no output on
failure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests import helpers
from tests.helpers import corpus, make_tokenizer
from tests.tiny import build_tiny

pytestmark = [
    pytest.mark.filterwarnings("ignore:Initializing zero-element tensors"),
    pytest.mark.usefixtures("one_thread"),
]

ROOT = Path(__file__).resolve().parents[1]


# The one CLI runner (tests/helpers.py), with this file's settings.
run_cli = partial(helpers.run_cli, one_thread=True)


def invoke(*args: str):
    from moetool.cli import app

    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quantize-cli")
    build_tiny("mixtral", root / "moe")
    make_tokenizer(path=root / "moe")
    build_tiny("llama", root / "dense")
    make_tokenizer(path=root / "dense")
    data = root / "calib.jsonl"
    data.write_text("".join(json.dumps({"text": d.text, "src": d.domain}) + "\n" for d in corpus(90)))
    return {"moe": root / "moe", "dense": root / "dense", "data": data}


def one_line_error(result: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_json_run_then_eval_profile_inspect(setup, tmp_path):
    out = tmp_path / "w4"
    result = run_cli(
        "quantize", str(setup["moe"]), "-o", str(out), "--bits", "4", "-g", "16",
        "-d", str(setup["data"]), "--max-tokens", "512", "--seq-len", "32", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["schema_version"] == 1
    assert doc["quantization"]["quant_method"] == "moetool" and doc["quantization"]["bits"] == 4
    assert doc["verification"]["passed"] is True and doc["verification"]["routed_experts_quantized"] == 1.0
    assert 4.0 < doc["expert_bits_per_param"] < 6.0
    assert (
        doc["bits_per_param"]["routed_experts"]["quantized_params"] == doc["bits_per_param"]["routed_experts"]["params"]
    )
    assert doc["calibration"]["tokens"] == 512
    assert len(doc["coverage"]) == 3 and all(len(layer["experts"]) == 4 for layer in doc["coverage"])
    assert {"config.json", "README.md", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))
    card = (out / "README.md").read_text()
    assert "moetool quantize" in card and "quantized" in card and "bits per parameter: routed_experts" in card

    # In-process from here on (a fresh interpreter per command only re-imports torch).
    evaluated = invoke(
        "eval", str(out), "-d", str(setup["data"]), "--reference", str(setup["moe"]), "--seq-len", "32", "--json"
    )
    assert evaluated.exit_code == 0, evaluated.output
    figures = json.loads(evaluated.stdout)
    assert figures["perplexity"] > 1 and 0 <= figures["kl"] < 0.5 and figures["top1_agreement"] > 0.5

    profiled = invoke("profile-routing", str(out), "-d", str(setup["data"]), "--seq-len", "32", "--json")
    assert profiled.exit_code == 0, profiled.output
    assert len(json.loads(profiled.stdout)["layers"]) == 3

    inspected = invoke("inspect", str(out), "--json")
    assert inspected.exit_code == 0, inspected.output
    counts = json.loads(inspected.output)
    source = json.loads(invoke("inspect", str(setup["moe"]), "--json").output)
    assert counts["quantization"] == "moetool"
    assert counts["total_params"] == source["total_params"]  # codes counted as the parameters they hold
    assert counts["categories"]["routed_experts"] == source["categories"]["routed_experts"]


def test_human_output_has_tables(setup, tmp_path):
    result = invoke(
        "quantize", str(setup["moe"]), "-o", str(tmp_path / "q"), "--method", "rtn", "--bits", "3", "-g", "8"
    )
    assert result.exit_code == 0, result.output
    assert "Bits per parameter" in result.output and "routed_experts" in result.output
    assert "check coverage" in result.output and "check reload" in result.output
    gptq = invoke(
        "quantize", str(setup["moe"]), "-o", str(tmp_path / "g"), "-d", str(setup["data"]),
        "--max-tokens", "256", "--seq-len", "32", "-g", "8",
    )  # fmt: skip
    assert gptq.exit_code == 0, gptq.output
    assert "Calibration coverage" in gptq.output and "GPTQ vs round-to-nearest" in gptq.output


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["--bits", "5", "--method", "rtn"], 2, "--bits must be 2, 3, 4 or 8"),
        (["--bits", "4", "--ternary", "--method", "rtn"], 2, "exclude each other"),
        (["--method", "nf4", "--bits", "3"], 2, "4-bit codes"),
        (["--group-size", "-1", "--method", "rtn"], 2, "--group-size"),
        (["--method", "gptq"], 2, "needs calibration text"),
        (["--method", "awq"], 2, "unknown --method"),
        (["--method", "rtn", "--fallback", "skip"], 2, "unknown --fallback"),
        (["--method", "rtn", "--device", "tpu"], 2, "--device"),
    ],
)
def test_bad_options(setup, tmp_path, args, code, needle):
    result = invoke("quantize", str(setup["moe"]), "-o", str(tmp_path / "x"), *args)
    assert result.exit_code == code, result.output
    assert needle in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "x").exists()


def test_refused_inputs_exit_codes(setup, tmp_path):
    dense = run_cli("quantize", str(setup["dense"]), "-o", str(tmp_path / "x"), "--method", "rtn")
    one_line_error(dense, 1, "not a Mixture-of-Experts")
    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "file").write_text("x")
    result = invoke("quantize", str(setup["moe"]), "-o", str(existing), "--method", "rtn", "--json")
    assert result.exit_code == 2
    assert json.loads(result.stdout)["error"]["code"] == "OUTPUT_EXISTS"
    done = tmp_path / "done"
    assert invoke("quantize", str(setup["moe"]), "-o", str(done), "--method", "rtn", "--no-verify").exit_code == 0
    again = invoke("quantize", str(done), "-o", str(tmp_path / "again"), "--method", "rtn", "--json")
    assert again.exit_code == 1
    assert json.loads(again.stdout)["error"]["code"] == "QUANTIZED_INPUT"
    assert not (tmp_path / "x").exists() and not (tmp_path / "again").exists()


def test_failed_check_exits_1_and_writes_nothing(setup, tmp_path, monkeypatch):
    from moetool.quantize import verify

    def failing(*args, **kwargs):
        raise verify.VerificationError("forced failure", code="EXPERTS_NOT_QUANTIZED")

    monkeypatch.setattr(verify, "check_coverage", failing)
    result = invoke("quantize", str(setup["moe"]), "-o", str(tmp_path / "q"), "--method", "rtn")
    assert result.exit_code == 1, result.output
    assert "forced failure" in result.output
    assert list(tmp_path.iterdir()) == []


PROBE = """
import sys
sys.argv = ["moetool", *{args!r}]
from moetool.cli import main
try:
    main()
except SystemExit as exc:
    code = exc.code or 0
heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
print("HEAVY=" + ",".join(heavy), file=sys.stderr)
"""


def test_help_and_inspect_of_quantized_output_stay_light(setup, tmp_path):
    out = tmp_path / "q"
    assert invoke("quantize", str(setup["moe"]), "-o", str(out), "--method", "rtn", "--no-verify").exit_code == 0
    for args in (["quantize", "--help"], ["inspect", str(out), "--json"]):
        result = subprocess.run(
            [sys.executable, "-c", PROBE.format(args=args)], capture_output=True, text=True, cwd=ROOT, timeout=120
        )
        assert "HEAVY=\n" in result.stderr + "\n", result.stderr
