"""Validation before any work (issue 14): lying configs, wrong shapes, missing experts, top-k, FP8.

Each case is checked three ways: the finding :func:`moetool.validate.validate_checkpoint` returns,
``inspect`` showing it as a warning (``--strict``: exit 1), and the commands refusing the input with
one line before they compute anything (and before quantize imports torch).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moetool.cli import app
from moetool.errors import ConfigError, ShapeMismatchError
from moetool.io.checkpoint import Checkpoint
from moetool.io.safetensors_header import SafetensorsHeader, TensorInfo
from moetool.validate import ERROR, FATAL, check_input, validate_checkpoint, validate_config
from tests.malformed import (
    EXPERT,
    ROOT,
    ROUTER,
    TINY_MOE,
    copy_checkpoint,
    drop_tensor,
    edit_config,
    rewrite_tensors,
    snapshot,
    to_dtype,
    transpose_tensor,
    truncate_rows,
)

CONFIGS = ROOT / "tests" / "data" / "moe-configs"
ENV = {"NO_COLOR": "1", "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}


def run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args], env=ENV)


def assert_refused(result, *needles: str, code: int = 1) -> str:
    """Exit ``code``, exactly one error line naming ``needles``, no traceback."""
    err = result.stderr
    assert result.exit_code == code, (result.exit_code, err, result.stdout)
    assert "Traceback" not in err and "internal error" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return copy_checkpoint(tmp_path / "model")


def refuse_everywhere(folder: Path, tmp_path: Path, *needles: str) -> None:
    """merge, quantize and profile-routing refuse ``folder`` fast, write nothing and leave it as it was."""
    data = ROOT / "examples" / "data" / "heldout.jsonl"
    before = snapshot(folder)
    for command in (
        ["merge", folder, "-o", tmp_path / "merged", "-n", "4", "-d", data],
        ["quantize", folder, "-o", tmp_path / "quantized", "--method", "rtn"],
        ["profile-routing", folder, "-d", data],
    ):
        started = time.perf_counter()
        assert_refused(run(*command), *needles)
        assert time.perf_counter() - started < 5
    assert not (tmp_path / "merged").exists() and not (tmp_path / "quantized").exists()
    assert snapshot(folder) == before


# ----------------------------------------------------------------------------- no false alarms


def test_the_example_checkpoint_is_clean() -> None:
    checkpoint = Checkpoint.open(TINY_MOE)
    assert validate_checkpoint(checkpoint, float_weights=True) == []
    result = check_input(checkpoint, float_weights=True)
    assert result.findings == [] and result.nonfinite == []


@pytest.mark.parametrize("folder", sorted(p.name for p in CONFIGS.iterdir() if p.is_dir()))
def test_real_configs_are_clean(folder: str) -> None:
    assert validate_config(json.loads((CONFIGS / folder / "config.json").read_text())) == []


@pytest.mark.parametrize(
    "folder", ["mistralai__Mixtral-8x7B-v0.1", "mistralai__Mixtral-8x22B-v0.1", "openai__gpt-oss-20b"]
)
def test_real_tensor_names_are_what_the_registry_expects(folder: str) -> None:
    """The weight names of real Hub checkpoints (their index files): nothing reported missing."""
    from moetool.arch import family_for_config, resolve_dims
    from moetool.arch.plan import planned_tensors

    config = json.loads((CONFIGS / folder / "config.json").read_text())
    names = json.loads((CONFIGS / folder / "model.safetensors.index.json").read_text())["weight_map"]
    spec = family_for_config(config)
    shapes = {t.name: t.shape for t in planned_tensors(spec, resolve_dims(spec, config))}
    tensors, offset = {}, 0
    for name in names:
        packed = name.endswith(("_blocks", "_scales"))
        shape = (2,) if packed else shapes.get(name, (1,))
        size = 1 if packed else 2
        for dim in shape:
            size *= dim
        tensors[name] = TensorInfo(name, "U8" if packed else "BF16", tuple(shape), "x", offset, offset + size)
        offset += size
    header = SafetensorsHeader("x", tensors, {}, 0, None)
    checkpoint = Checkpoint.from_headers(name=folder, config=config, headers=[header])
    assert validate_checkpoint(checkpoint) == []


# ----------------------------------------------------------------------------- config types (B18)


def test_float_integer_field_is_named_with_its_path(model: Path, tmp_path: Path) -> None:
    edit_config(model, hidden_size=160.0)
    [finding] = validate_checkpoint(Checkpoint.open(model))
    assert (finding.code, finding.level, finding.path) == ("CONFIG_INVALID", ERROR, "hidden_size")
    assert "160.0" in finding.message and "write 160" in finding.hint
    result = run("inspect", model)
    assert result.exit_code == 0 and "warning: config.json field hidden_size must be an integer" in result.stderr
    assert_refused(run("inspect", model, "--strict"), "hidden_size")
    refuse_everywhere(model, tmp_path, "hidden_size", "160.0")


def test_nested_field_path(tmp_path: Path) -> None:
    config = json.loads((CONFIGS / "databricks__dbrx-instruct" / "config.json").read_text())
    config["ffn_config"]["moe_top_k"] = 4.0
    [finding] = validate_config(config)
    assert finding.path == "ffn_config.moe_top_k"


def test_string_integer_field_stops_even_inspect(model: Path) -> None:
    edit_config(model, num_local_experts="8")
    assert validate_config(json.loads((model / "config.json").read_text()))[0].level == FATAL
    assert_refused(run("inspect", model), "num_local_experts", "a string")


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"num_hidden_layers": 10**9}, "num_hidden_layers"),
        ({"num_local_experts": 10**7}, "num_local_experts"),
        ({"num_local_experts": 40_000, "num_hidden_layers": 9_000}, "num_local_experts"),
    ],
)
def test_implausible_sizes_are_refused_at_once(model: Path, fields: dict, needle: str) -> None:
    edit_config(model, **fields)
    started = time.perf_counter()
    assert_refused(run("inspect", model), needle)
    assert time.perf_counter() - started < 5


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"rms_norm_eps": "1e-5"}, "rms_norm_eps"),
        ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
        ({"pad_token_id": 10**12}, "pad_token_id"),
        ({"attention_dropout": 7}, "attention_dropout"),
        ({"dtype": "float33"}, "dtype"),
    ],
)
def test_common_transformers_fields(model: Path, fields: dict, needle: str) -> None:
    edit_config(model, **fields)
    findings = validate_checkpoint(Checkpoint.open(model))
    assert [f.path for f in findings] == [needle]
    assert_refused(run("merge", model, "-o", model.parent / "out", "-n", "4", "--stats", model), needle)


def test_strict_transformers_types_are_one_line(model: Path) -> None:
    """transformers 5 configs refuse an int where a float belongs: one line, not a traceback."""
    edit_config(model, router_aux_loss_coef=1)
    assert validate_checkpoint(Checkpoint.open(model)) == []  # moetool's own checks let it through
    with pytest.raises(ConfigError, match="router_aux_loss_coef"):
        check_input(Checkpoint.open(model), scan_nonfinite=False)
    data = ROOT / "examples" / "data" / "heldout.jsonl"
    assert_refused(run("eval", model, "-d", data, "--max-tokens", "64"), "router_aux_loss_coef")


def test_group_limited_routing_must_be_able_to_pick_k() -> None:
    config = json.loads((CONFIGS / "deepseek-ai__DeepSeek-V3" / "config.json").read_text())
    assert validate_config(config) == []
    config["n_group"] = 7  # does not divide 256 experts
    assert [f.code for f in validate_config(config)] == ["CONFIG_INVALID"]
    config["n_group"], config["topk_group"] = 8, 0
    assert "topk_group" in validate_config(config)[0].message
    config["topk_group"], config["num_experts_per_tok"] = 1, 64  # 1 group of 32 cannot give 64
    assert [f.code for f in validate_config(config)] == ["TOPK_INVALID"]


# ----------------------------------------------------------------------------- shapes (B21, B22)


@pytest.mark.parametrize(
    ("break_it", "needles"),
    [
        (lambda m: truncate_rows(m, ROUTER.format(L=1), 6), ["gate.weight has shape [6, 160]", "[8, 160]"]),
        (lambda m: transpose_tensor(m, EXPERT.format(L=2, E=3, P="w1")), ["experts.3.w1.weight", "transposed"]),
        (lambda m: edit_config(m, hidden_size=128), ["hidden_size", "[4096, 128]"]),
        (lambda m: edit_config(m, num_local_experts=6), ["num_local_experts"]),
        (lambda m: edit_config(m, intermediate_size=255), ["intermediate_size"]),
    ],
    ids=["router-rows", "transposed-expert", "hidden-size", "expert-count", "expert-width"],
)
def test_shapes_that_disagree_with_the_config(model: Path, tmp_path: Path, break_it, needles) -> None:
    break_it(model)
    findings = validate_checkpoint(Checkpoint.open(model))
    assert findings[0].code == "SHAPE_MISMATCH"
    assert all(n in findings[0].message for n in needles), findings[0].message
    result = run("inspect", model)
    assert result.exit_code == 0 and "warning:" in result.stderr
    assert_refused(run("inspect", model, "--strict"), needles[0])
    refuse_everywhere(model, tmp_path, needles[0])
    error = run("merge", model, "-o", tmp_path / "m", "-n", "4", "--stats", model, "--json")
    assert json.loads(error.stdout)["error"]["code"] == "SHAPE_MISMATCH"
    with pytest.raises(ShapeMismatchError):
        check_input(Checkpoint.open(model), scan_nonfinite=False, transformers_config=False)


def test_missing_single_expert_tensor(model: Path, tmp_path: Path) -> None:
    drop_tensor(model, EXPERT.format(L=3, E=7, P="w2"))
    [finding] = validate_checkpoint(Checkpoint.open(model))
    assert finding.code == "EXPERT_MISSING"
    assert "layer 3 expert 7" in finding.message and "experts.7.w2.weight" in finding.message
    assert "layer 3 expert 7" in run("inspect", model).stderr
    report = json.loads(run("inspect", model, "--json").stdout)
    assert report["findings"][0]["code"] == "EXPERT_MISSING"
    refuse_everywhere(model, tmp_path, "layer 3 expert 7")


def test_missing_other_tensor(model: Path) -> None:
    drop_tensor(model, "model.layers.2.self_attn.o_proj.weight")
    [finding] = validate_checkpoint(Checkpoint.open(model))
    assert finding.code == "TENSOR_MISSING" and "o_proj" in finding.message


# ----------------------------------------------------------------------------- top-k


@pytest.mark.parametrize("top_k", [0, 9])
def test_top_k_outside_the_experts(model: Path, tmp_path: Path, top_k: int) -> None:
    edit_config(model, num_experts_per_tok=top_k)
    [finding] = validate_checkpoint(Checkpoint.open(model))
    assert finding.code == "TOPK_INVALID"
    result = run("inspect", model)
    assert result.exit_code == 0 and f"num_experts_per_tok is {top_k}" in result.stderr
    refuse_everywhere(model, tmp_path, f"num_experts_per_tok is {top_k}", "1..8")
    result = run("eval", model, "-d", ROOT / "examples" / "data" / "heldout.jsonl")
    assert "selected index" not in assert_refused(result, "num_experts_per_tok")


# ----------------------------------------------------------------------------- quantized inputs (B8, B26)


def test_fp8_input_is_named(model: Path, tmp_path: Path) -> None:
    experts = [EXPERT.format(L=0, E=e, P=p) for e in range(8) for p in ("w1", "w2", "w3")]
    to_dtype(model, experts, "float8_e4m3fn")
    [finding] = validate_checkpoint(Checkpoint.open(model), float_weights=True)
    assert finding.code == "QUANTIZED_INPUT" and "FP8" in finding.message
    assert validate_checkpoint(Checkpoint.open(model)) == []  # inspect is fine with FP8
    result = run("quantize", model, "-o", tmp_path / "q", "--method", "rtn", "--json")
    assert_refused(result, "F8_E4M3 (FP8)")
    assert json.loads(result.stdout)["error"]["code"] == "QUANTIZED_INPUT"
    assert_refused(run("merge", model, "-o", tmp_path / "m", "-n", "4", "--stats", model), "FP8")


def test_quantization_config_is_refused_by_float_commands(model: Path, tmp_path: Path) -> None:
    edit_config(model, quantization_config={"quant_method": "fp8"})
    assert_refused(run("upcycle", model, "-o", tmp_path / "u", "--num-experts", "2", "--top-k", "1"), "fp8")


def test_integer_weights_without_a_quantization_config(model: Path, tmp_path: Path) -> None:
    """A header that says I32 for a float weight: transformers would load the integers as weights."""
    from tests.malformed import edit_header

    edit_header(model, lambda h: h["model.layers.0.self_attn.q_proj.weight"].__setitem__("dtype", "I32"))
    [finding] = validate_checkpoint(Checkpoint.open(model), float_weights=True)
    assert finding.code == "DTYPE_INVALID"
    assert_refused(run("eval", model, "-d", ROOT / "examples" / "data" / "heldout.jsonl"), "q_proj", "I32")
    assert_refused(run("quantize", model, "-o", tmp_path / "q", "--method", "rtn"), "integers")


QUANTIZE_PROBE = """
import sys
sys.argv = ["moetool", "quantize", {model!r}, "-o", {out!r}, "--method", "rtn"]
from moetool.cli import main
try:
    main()
except SystemExit as exc:
    print("EXIT=" + str(exc.code), file=sys.stderr)
print("TORCH=" + str("torch" in sys.modules), file=sys.stderr)
"""


def test_quantize_refuses_a_bad_input_before_importing_torch(model: Path, tmp_path: Path) -> None:
    edit_config(model, hidden_size=160.0)
    code = QUANTIZE_PROBE.format(model=str(model), out=str(tmp_path / "q"))
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    elapsed = time.perf_counter() - started
    assert "EXIT=1" in result.stderr and "TORCH=False" in result.stderr, result.stderr
    assert "hidden_size" in result.stderr
    assert elapsed < 10, elapsed  # the interpreter start included; torch alone takes longer here


# ----------------------------------------------------------------------------- extra tensors


def test_extra_layer_tensor_is_a_warning_and_merge_keeps_it(model: Path) -> None:
    """``layers.4.eh_proj`` in a Mixtral (no MTP): reported, passed through by merge, never dropped."""
    from moetool.arch import family_for_config, resolve_dims
    from moetool.merge.layout import LayerTensors, find_prefix
    from moetool.merge.plan import output_tensors

    name = "model.layers.4.eh_proj.weight"
    rewrite_tensors(model, lambda t: t.__setitem__(name, t["model.norm.weight"].clone()))
    checkpoint = Checkpoint.open(model)
    [finding] = validate_checkpoint(checkpoint, float_weights=True)
    assert finding.code == "EXTRA_TENSORS" and finding.level == "warning"
    spec = family_for_config(checkpoint.config)
    dims = resolve_dims(spec, checkpoint.config)
    layout = LayerTensors(spec, dims, prefix=find_prefix(spec, checkpoint.tensors, 0))
    tensors, _sources, dropped = output_tensors(checkpoint, spec, dims, layout, m=4, expert_dtype="F32")
    assert dropped == []
    assert name in [t.name for t in tensors]


def test_mtp_is_still_dropped_for_a_family_that_has_it() -> None:
    from moetool.arch import family_for_config, resolve_dims
    from moetool.count.classify import TensorClassifier

    config = json.loads((CONFIGS / "deepseek-ai__DeepSeek-V3" / "config.json").read_text())
    spec = family_for_config(config)
    placement = TensorClassifier(spec, resolve_dims(spec, config)).classify("model.layers.61.eh_proj.weight")
    assert placement.category == "mtp"


# ----------------------------------------------------------------------------- non-UTF-8 names (B39)

NON_UTF8_PROBE = """
import os, shutil, sys
src, parent = sys.argv[1], os.fsencode(sys.argv[2])
folder = os.path.join(parent, b"model-\\xff")
shutil.copytree(os.fsencode(src), folder)
sys.argv = ["moetool", "inspect", os.fsdecode(folder), "--json"]
from moetool.cli import main
main()
"""


def test_non_utf8_folder_name_gives_valid_json(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", NON_UTF8_PROBE, str(TINY_MOE), str(tmp_path)],
        capture_output=True,
        cwd=ROOT,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8", "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout.decode("utf-8"))  # strict: raises on an invalid byte
    assert document["model"].endswith("model-\udcff")
    assert b"\\udcff" in result.stdout


# ----------------------------------------------------------------------------- --split with local data


def test_split_with_a_local_file_is_a_usage_error(tmp_path: Path) -> None:
    data = ROOT / "examples" / "data" / "heldout.jsonl"
    assert_refused(run("eval", TINY_MOE, "-d", data, "--split", "validation"), "--split validation", code=2)
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("hello world\n")
    assert_refused(run("eval", TINY_MOE, "-d", folder, "--split", "test"), "--split test", code=2)
