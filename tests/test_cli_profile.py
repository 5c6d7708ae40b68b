"""``moetool profile-routing`` end to end: --json, --out files, --fail-if exit 3, bad inputs."""

from __future__ import annotations

import csv
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
    root = tmp_path_factory.mktemp("profile")
    model = root / "moe"
    build_tiny("mixtral", model)
    make_tokenizer(path=model)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": d.text, "src": d.domain}) + "\n" for d in corpus()), encoding="utf-8")
    return model, data, root


def test_json_document(setup):
    model, data, _ = setup
    result = run_cli(
        "profile-routing", str(model), "-d", str(data), "--domain-field", "src", "--seq-len", "16", "--json"
    )
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["schema_version"] == 1
    assert doc["num_experts"] == 4 and doc["top_k"] == 2
    assert doc["tokens"] > 0
    assert [layer["layer"] for layer in doc["layers"]] == [0, 1, 2]
    for layer in doc["layers"]:
        assert sum(layer["counts"]) == doc["tokens"] * 2
        for key in ("cv", "entropy", "aux_loss", "gini", "max_mean", "dropped", "z_loss", "coactivation"):
            assert key in layer
    assert set(doc["domains"]) == {"code", "math", "web"}
    assert sum(d["tokens"] for d in doc["domains"].values()) == doc["tokens"]
    for i, layer in enumerate(doc["layers"]):
        per_domain = [d["layers"][i]["counts"] for d in doc["domains"].values()]
        assert [sum(col) for col in zip(*per_domain, strict=True)] == layer["counts"]


def test_out_folder_files(setup):
    model, data, root = setup
    out = root / "report"
    result = run_cli(
        "profile-routing", str(model), "-d", str(data), "--domain-field", "src", "--seq-len", "16", "--out", str(out)
    )
    assert result.returncode == 0, result.stderr
    names = {p.name for p in out.iterdir()}
    assert {
        "routing-stats.json",
        "expert_counts.csv",
        "load_heatmap.png",
        "coactivation.png",
        "domain_load.png",
        "report.html",
    } <= names
    rows = list(csv.reader((out / "expert_counts.csv").open()))
    assert rows[0] == ["layer", "expert_0", "expert_1", "expert_2", "expert_3"]
    assert len(rows) == 4
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html  # self-contained
    assert (out / "load_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from moetool.routing.stats import RoutingStats

    stats = RoutingStats.load(out / "routing-stats.json")
    assert [r[1:] for r in rows[1:]] == [[str(c) for c in layer] for layer in stats.count_matrix()]
    # Human output on stdout: the per-layer table.
    assert "Per layer" in result.stdout
    # A second run refuses to overwrite without --overwrite (usage error: exit 2).
    again = run_cli("profile-routing", str(model), "-d", str(data), "--out", str(out))
    assert again.returncode == 2


def test_fail_if_exits_3(setup):
    model, data, _ = setup
    result = run_cli(
        "profile-routing",
        str(model),
        "-d",
        str(data),
        "--seq-len",
        "16",
        "--json",
        "--fail-if",
        "entropy<2",
        "--fail-if",
        "cv>100",
    )
    assert result.returncode == 3, result.stderr
    assert json.loads(result.stdout)["tokens"] > 0  # results still printed
    lines = [line for line in result.stderr.splitlines() if "broke --fail-if 'entropy<2'" in line]
    assert len(lines) == 3  # every layer's entropy is below 2 (normalised entropy <= 1)
    assert "layer 0: entropy=" in lines[0]
    assert "cv>100" not in result.stderr.replace("--fail-if 'entropy<2'", "")


def test_fail_if_passes(setup):
    model, data, _ = setup
    result = run_cli("profile-routing", str(model), "-d", str(data), "--seq-len", "16", "--json", "--fail-if", "cv>100")
    assert result.returncode == 0


def test_bad_threshold_is_usage_error(setup):
    model, data, _ = setup
    result = run_cli("profile-routing", str(model), "-d", str(data), "--fail-if", "wobble>1")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr


def test_out_inside_model_refused(setup):
    model, data, _ = setup
    result = run_cli("profile-routing", str(model), "-d", str(data), "--out", str(model / "report"))
    assert result.returncode == 2
    assert not (model / "report").exists()


def test_dense_model_refused(setup, tmp_path):
    _, data, _ = setup
    dense = tmp_path / "dense"
    build_tiny("llama", dense)
    make_tokenizer(path=dense)
    result = run_cli("profile-routing", str(dense), "-d", str(data))
    assert result.returncode == 1
    assert "dense" in result.stderr and "Traceback" not in result.stderr


def test_missing_column_before_model_load(setup):
    model, data, _ = setup
    result = run_cli("profile-routing", str(model), "-d", str(data), "--text-field", "body")
    assert result.returncode == 1
    assert "body" in result.stderr
