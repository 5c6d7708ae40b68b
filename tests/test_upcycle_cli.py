"""The CLI contract of ``moetool upcycle``: --json, --dry-run, exit codes, one-line errors, no output on failure."""

from __future__ import annotations

import json
import os
import subprocess
from functools import partial
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests import helpers
from tests.tiny import build_tiny

# transformers initialises a zero-width shared expert (Qwen2-MoE without shared experts) before loading it.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Initializing zero-element tensors"),
    pytest.mark.usefixtures("one_thread"),
]

ROOT = Path(__file__).resolve().parents[1]


# The one CLI runner (tests/helpers.py), with this file's settings.
run_cli = partial(helpers.run_cli, one_thread=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("upcycle-cli")
    build_tiny("qwen2", root / "dense")
    build_tiny("mixtral", root / "moe")
    return root / "dense", root / "moe"


def one_line_error(result: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_json_run_then_dry_run(models, tmp_path):
    dense, _ = models
    out = tmp_path / "moe"
    result = run_cli(
        "upcycle", str(dense), "-o", str(out), "-e", "4", "-k", "2", "-g", "2", "--shared-experts", "1", "--json"
    )
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["schema_version"] == 1 and doc["dry_run"] is False
    assert doc["plan"]["num_experts"] == 8 and doc["plan"]["top_k"] == 4 and doc["plan"]["shared_width"] == 48
    assert doc["verification"]["status"] == "passed"
    assert {c["name"] for c in doc["verification"]["checks"]} == {"files", "layers", "experts", "logits"}
    assert all(c["max_abs_diff"] <= 1e-4 for c in doc["verification"]["checks"] if c["max_abs_diff"] is not None)
    assert doc["bytes_written"] == doc["predicted_bytes"]
    assert {"config.json", "README.md", "model.safetensors"} <= set(os.listdir(out))
    card = (out / "README.md").read_text()
    assert "moetool upcycle" in card and "upcycled" in card and "logits max abs diff" in card

    dry = run_cli(
        "upcycle",
        str(dense),
        "-o",
        str(tmp_path / "dry"),
        "-e",
        "4",
        "-k",
        "2",
        "-g",
        "2",
        "--shared-experts",
        "1",
        "--dry-run",
    )
    assert dry.returncode == 0, dry.stderr
    assert "would write" in dry.stdout and "8 x 24" in dry.stdout
    assert not (tmp_path / "dry").exists()


def test_refusals_exit_codes(models, tmp_path):
    dense, moe = models
    one_line_error(
        run_cli("upcycle", str(moe), "-o", str(tmp_path / "x"), "-e", "4", "-k", "2"),
        1,
        "already a Mixture-of-Experts model",
    )
    bad = run_cli("upcycle", str(dense), "-o", str(tmp_path / "x"), "-e", "4", "-k", "9", "--json")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert json.loads(bad.stdout)["error"]["code"] == "BAD_TOP_K"
    one_line_error(run_cli("upcycle", str(dense), "-o", str(dense / "out"), "-e", "4", "-k", "2"), 2, "overlaps")
    assert not list(tmp_path.iterdir())


def test_failed_check_exits_1_and_writes_nothing(models, tmp_path, monkeypatch):
    from moetool.cli import app
    from moetool.upcycle import verify

    def failing(plan, source, written, **kwargs):
        return [verify.CheckResult("layers", False, 0.5, 1e-6, "forced failure")]

    monkeypatch.setattr(verify, "check_layers", failing)
    dense, _ = models
    result = CliRunner().invoke(app, ["upcycle", str(dense), "-o", str(tmp_path / "moe"), "-e", "4", "-k", "2"])
    assert result.exit_code == 1, result.output
    assert "verification failed: layers check" in result.output
    assert list(tmp_path.iterdir()) == []
