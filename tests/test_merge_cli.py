"""``moetool merge`` end to end through the CLI: --json document, human report, model card, exit codes."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path

import pytest

from tests import helpers
from tests.helpers import corpus, make_tokenizer
from tests.tiny import build_tiny

ROOT = Path(__file__).resolve().parents[1]


# The one CLI runner (tests/helpers.py), with this file's settings.
run_cli = partial(helpers.run_cli, columns=160)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge-cli")
    model = root / "moe"
    build_tiny("mixtral", model)
    make_tokenizer(path=model)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in corpus(120)), encoding="utf-8")
    return model, data, root


def test_json_document_with_evaluation(setup):
    model, data, root = setup
    out = root / "two"
    result = run_cli(
        "merge", str(model), "-o", str(out), "--num-experts", "2", "-d", str(data), "--seq-len", "16",
        "--max-tokens", "300", "--method", "merge-frequency", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["schema_version"] == 1
    assert doc["num_experts_before"] == 4 and doc["num_experts_after"] == 2 and doc["top_k_after"] == 2
    assert doc["config_changes"]["num_local_experts"] == [4, 2]
    assert [layer["layer"] for layer in doc["layers"]] == [0, 1, 2]
    for layer in doc["layers"]:
        members = sorted(e for expert in layer["experts"] for e in expert["from"])
        assert members == [0, 1, 2, 3] and len(layer["experts"]) == 2
    assert doc["size"]["predicted_bytes"] == doc["size"]["written_bytes"] < doc["size"]["source_bytes"]
    assert doc["calibration"]["tokens"] == 300
    figures = doc["eval"]
    assert figures["tokens"] > 0 and figures["perplexity_before"] > 0 and figures["perplexity_after"] > 0
    assert 0 <= figures["top1_agreement"] <= 1
    card = (out / "README.md").read_text()
    assert "merge-frequency" in card and "perplexity after" in card and "| 0 |" in card


def test_human_report(setup):
    model, data, root = setup
    out = root / "dense"
    result = run_cli("merge", str(model), "-o", str(out), "--to-dense", "-d", str(data), "--seq-len", "16",
                     "--max-tokens", "300", "--eval-max-tokens", "200")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Per MoE layer" in result.stdout and "dense FFN from experts" in result.stdout
    assert "perplexity after" in result.stdout
    assert json.loads((out / "config.json").read_text())["model_type"] == "mistral"


@pytest.mark.parametrize(
    ("args", "code", "exit_code"),
    [
        (["--num-experts", "4"], "M_OUT_OF_RANGE", 2),
        (["--num-experts", "2", "--to-dense"], "USAGE", 2),
        (["--num-experts", "2", "--method", "wobble"], "USAGE", 2),
        (["--to-dense", "--dense-strategy", "top1", "--intermediate-size", "8"], "USAGE", 2),
    ],
)
def test_usage_errors(setup, args, code, exit_code):
    model, data, root = setup
    result = run_cli("merge", str(model), "-o", str(root / "never"), "-d", str(data), *args, "--json")
    assert result.returncode == exit_code, result.stderr
    assert json.loads(result.stdout)["error"]["code"] == code
    assert "Traceback" not in result.stderr
    assert not (root / "never").exists()


def test_output_inside_the_model_is_refused(setup):
    model, data, _ = setup
    result = run_cli("merge", str(model), "-o", str(model / "sub"), "--num-experts", "2", "-d", str(data), "--json")
    assert result.returncode == 2
    assert json.loads(result.stdout)["error"]["code"] == "OUTPUT_OVERLAPS_INPUT"
    assert not (model / "sub").exists()


def test_dense_input_is_not_moe(setup, tmp_path):
    _, data, _ = setup
    dense = tmp_path / "dense"
    build_tiny("mistral", dense)
    make_tokenizer(path=dense)
    result = run_cli("merge", str(dense), "-o", str(tmp_path / "o"), "--num-experts", "2", "-d", str(data), "--json")
    assert result.returncode == 1
    assert json.loads(result.stdout)["error"]["code"] == "NOT_MOE"
    assert "Traceback" not in result.stderr


def test_missing_dataset_column_before_model_load(setup):
    model, data, root = setup
    result = run_cli("merge", str(model), "-o", str(root / "nope"), "--num-experts", "2", "-d", str(data),
                     "--text-field", "body")  # fmt: skip
    assert result.returncode == 1
    assert "body" in result.stderr and not (root / "nope").exists()
