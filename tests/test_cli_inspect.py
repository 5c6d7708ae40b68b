"""The CLI contract of ``moetool inspect``: stdout/stderr, exit codes, --json, bad inputs, no torch."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest

from tests import helpers
from tests.tiny import build_tiny

ROOT = Path(__file__).resolve().parents[1]


# The one CLI runner (tests/helpers.py), with this file's settings.
run_cli = partial(helpers.run_cli, module=False, timeout=120)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-qwen2-moe")
    build_tiny("qwen2_moe", path)
    return path


def assert_one_line_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:")
    for needle in needles:
        assert needle in lines[0], lines[0]


# ----------------------------------------------------------------------------- happy paths


def test_json_document(tiny_moe):
    result = run_cli("inspect", str(tiny_moe), "--json")
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["schema_version"] == 1
    assert doc["model_type"] == "qwen2_moe"
    assert doc["num_experts"] == 4 and doc["top_k"] == 2
    assert doc["total_params"] > doc["active_params"] > 0
    assert doc["categories"]["shared_experts"]["total"] > 0
    assert "layers" not in doc


def test_json_with_layers(tiny_moe):
    doc = json.loads(run_cli("inspect", str(tiny_moe), "--json", "--layers").stdout)
    assert [layer["kind"] for layer in doc["layers"]] == ["moe", "dense", "moe"]


def test_human_output_on_stdout(tiny_moe):
    result = run_cli("inspect", str(tiny_moe), "--layers")
    assert result.returncode == 0, result.stderr
    assert "total parameters" in result.stdout
    assert "active per token" in result.stdout
    assert "routed_experts" in result.stdout
    assert "Per layer" in result.stdout
    assert result.stderr == ""


def test_config_only_folder_and_flag(tiny_moe, tmp_path):
    shutil.copy(tiny_moe / "config.json", tmp_path / "config.json")
    from_config = json.loads(run_cli("inspect", str(tmp_path), "--json").stdout)
    from_headers = json.loads(run_cli("inspect", str(tiny_moe), "--json").stdout)
    forced = json.loads(run_cli("inspect", str(tiny_moe), "--json", "--config-only").stdout)
    assert from_config["source"] == forced["source"] == "config"
    assert from_headers["source"] == "safetensors"
    assert from_config["total_params"] == from_headers["total_params"] == forced["total_params"]
    assert from_config["active_params"] == from_headers["active_params"]


def test_python_dash_m(tiny_moe):
    result = run_cli("inspect", str(tiny_moe), "--json", module=True)
    assert result.returncode == 0
    assert json.loads(result.stdout)["model_type"] == "qwen2_moe"


def test_version_and_help():
    assert run_cli("--version").stdout.startswith("moetool ")
    result = run_cli("--help")
    assert result.returncode == 0
    assert "inspect" in result.stdout


def test_usage_error_exit_2(tiny_moe):
    result = run_cli("inspect", str(tiny_moe), "--no-such-flag")
    assert result.returncode == 2


# ----------------------------------------------------------------------------- start-up cost

PROBE = """
import sys
sys.argv = ["moetool", *{args!r}]
from moetool.cli import main
try:
    main()
except SystemExit as exc:
    code = exc.code or 0
heavy_modules = ("torch", "transformers", "numpy", "huggingface_hub", "safetensors.torch")
heavy = sorted(m for m in heavy_modules if m in sys.modules)
print("HEAVY=" + ",".join(heavy), file=sys.stderr)
"""


@pytest.mark.parametrize("args", [["--help"], ["inspect", "--help"], ["inspect", "{model}", "--json"]])
def test_no_torch_on_the_fast_paths(tiny_moe, args):
    args = [a.replace("{model}", str(tiny_moe)) for a in args]
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(args=args)], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert "HEAVY=\n" in result.stderr + "\n", result.stderr
    assert "HEAVY=" in result.stderr


# ----------------------------------------------------------------------------- bad inputs


def test_missing_path():
    assert_one_line_error(run_cli("inspect", "./definitely/missing/model"), "no such folder")


def test_path_is_a_file(tiny_moe):
    assert_one_line_error(run_cli("inspect", str(tiny_moe / "config.json")), "is a file")


def test_missing_config(tmp_path):
    (tmp_path / "weights").mkdir()
    assert_one_line_error(run_cli("inspect", str(tmp_path / "weights")), "config.json")


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b'{"model_type": "mixtral", "model_type": "qwen2"}',
        b"\xff\xfe",
        b"[1, 2]",
        b"[" * 100000,
    ],
)
def test_invalid_config(tmp_path, content):
    (tmp_path / "config.json").write_bytes(content)
    assert_one_line_error(run_cli("inspect", str(tmp_path)), "config.json")


def test_wrong_field_type(tiny_moe, tmp_path):
    config = json.loads((tiny_moe / "config.json").read_text())
    config["num_experts_per_tok"] = "2"
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert_one_line_error(run_cli("inspect", str(tmp_path)), "num_experts_per_tok")


def test_unknown_architecture_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "frobnicate", "architectures": ["FrobLM"]}))
    result = run_cli("inspect", str(tmp_path))
    assert_one_line_error(result, "frobnicate", "mixtral", "deepseek_v3")


def _copy(tiny_moe: Path, tmp_path: Path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(tiny_moe, target)
    return target


def test_truncated_safetensors(tiny_moe, tmp_path):
    model = _copy(tiny_moe, tmp_path)
    shard = model / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-2])
    assert_one_line_error(run_cli("inspect", str(model)), "model.safetensors")


def test_lying_header_length(tiny_moe, tmp_path):
    model = _copy(tiny_moe, tmp_path)
    shard = model / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[:8] = struct.pack("<Q", 2**62)
    shard.write_bytes(bytes(data))
    assert_one_line_error(run_cli("inspect", str(model)), "model.safetensors")


def test_lying_shape(tiny_moe, tmp_path):
    model = _copy(tiny_moe, tmp_path)
    shard = model / "model.safetensors"
    data = shard.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [d + 1 for d in header[name]["shape"]]
    new = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(new) == n
    shard.write_bytes(data[:8] + new + data[8 + n :])
    assert_one_line_error(run_cli("inspect", str(model)), name)


def _write_index(model: Path, weight_map: dict) -> None:
    (model / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": 1}, "weight_map": weight_map})
    )


def test_index_names_missing_shard(tiny_moe, tmp_path):
    model = _copy(tiny_moe, tmp_path)
    (model / "model.safetensors").rename(model / "model-00001-of-00002.safetensors")
    _write_index(
        model,
        {"a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00002-of-00002.safetensors"},
    )
    assert_one_line_error(run_cli("inspect", str(model)), "model-00002-of-00002.safetensors")


@pytest.mark.parametrize("bad", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_path_outside_folder(tiny_moe, tmp_path, bad):
    model = _copy(tiny_moe, tmp_path)
    _write_index(model, {"a.weight": bad})
    assert_one_line_error(run_cli("inspect", str(model)))


def test_pickle_checkpoint_refused(tiny_moe, tmp_path):
    model = tmp_path / "pickled"
    model.mkdir()
    shutil.copy(tiny_moe / "config.json", model / "config.json")
    (model / "pytorch_model.bin").write_bytes(b"not really a pickle")
    assert_one_line_error(run_cli("inspect", str(model)), "safetensors")


def test_unknown_repo_offline():
    assert_one_line_error(run_cli("inspect", "no-such-org/no-such-model"), "no-such-org/no-such-model")


def test_json_mode_error_document(tmp_path):
    result = run_cli("inspect", str(tmp_path / "missing"), "--json")
    assert result.returncode == 1
    doc = json.loads(result.stdout)
    assert doc["error"]["code"] == "SOURCE_NOT_FOUND"
    assert doc["schema_version"] == 1


def test_debug_shows_traceback(tmp_path):
    result = run_cli("inspect", str(tmp_path / "missing"), env={"MOETOOL_DEBUG": "1"})
    assert result.returncode == 1
    assert "Traceback" in result.stderr


def test_inspect_writes_nothing(tiny_moe):
    before = snapshot(tiny_moe)
    run_cli("inspect", str(tiny_moe), "--json")
    run_cli("inspect", str(tiny_moe), "--layers")
    assert snapshot(tiny_moe) == before
