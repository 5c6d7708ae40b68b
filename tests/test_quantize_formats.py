"""Storage formats of ``moetool quantize``: compressed-tensors and moetool's own, read back the way users do.

Per-expert on-disk layouts (Mixtral, Qwen3-MoE with a dense layer, DeepSeek-V3 with shared experts and a
dense first layer) and a fused one (GraniteMoE). Checked: the format ``auto`` picks and why; the
compressed-tensors library decompresses every written weight to exactly moetool's (bit for bit); stock
transformers loads per-expert families with no missing or unexpected tensors and the same logits, and
refuses the fused family loudly (moetool's loader then loads it); moetool-format outputs make stock
transformers stop with an error naming ``moetool.load_model`` (never random experts); ``export``
converts symmetric moetool-format checkpoints losslessly and refuses the rest with the reason.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moetool.errors import CheckpointError, UsageError
from moetool.io.checkpoint import Checkpoint
from moetool.quantize import QuantizeOptions, quantize
from moetool.quantize.formats.ct_pack import pack_int32, pack_int32_rows, unpack_int32, unpack_int32_rows
from moetool.quantize.grids import SymmetricGrid, dequantize_groups
from moetool.quantize.modules import QuantizedExperts
from moetool.quantize.rtn import rtn_quantize
from tests.tiny import build_tiny

pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ["mixtral", "qwen3_moe", "deepseek_v3", "granitemoe"]
PER_EXPERT = ["mixtral", "qwen3_moe", "deepseek_v3"]

try:
    import compressed_tensors  # noqa: F401

    HAVE_CT = True
except ImportError:  # the dev extra installs it; the tests that need it say so
    HAVE_CT = False
needs_ct = pytest.mark.skipif(not HAVE_CT, reason="needs the compressed-tensors package (pip install -e '.[dev]')")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("formats-models")
    paths = {}
    for family in FAMILIES:
        build_tiny(family, root / family)
        paths[family] = root / family
    return paths


@pytest.fixture(scope="module")
def ct_outputs(tiny, tmp_path_factory) -> dict[str, tuple[Path, object]]:
    """Each family quantized to symmetric 4-bit compressed-tensors (group 16 divides every row here)."""
    root = tmp_path_factory.mktemp("formats-ct")
    outputs = {}
    for family in FAMILIES:
        opts = QuantizeOptions(bits=4, method="rtn", group_size=16, output_format="compressed-tensors")
        outputs[family] = (root / family, quantize(tiny[family], root / family, opts))
    return outputs


def checks(result) -> dict[str, object]:
    return {c.name: c.passed for c in result.verification.checks}


def run_stock(code: str) -> subprocess.CompletedProcess:
    """Run Python without moetool imported (what a user of plain transformers does)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd="/", timeout=300)


# ----------------------------------------------------------------------------- packing and the symmetric grid


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("n", [8, 32, 48, 160, 7])
def test_int32_packing_round_trip_and_matches_the_library(bits, n):
    gen = torch.Generator().manual_seed(n * 10 + bits)
    codes = torch.randint(0, 1 << bits, (3, n), generator=gen).to(torch.uint8)
    packed = pack_int32(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (3, (n * bits + 31) // 32)
    assert torch.equal(unpack_int32(packed, bits, n), codes)
    zeros = torch.randint(0, 1 << bits, (n, 2), generator=gen).to(torch.uint8)
    assert torch.equal(unpack_int32_rows(pack_int32_rows(zeros, bits), bits, n), zeros)
    if HAVE_CT:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

        signed = (codes.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)
        assert torch.equal(packed, pack_to_int32(signed, bits))
        signed_zeros = (zeros.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)
        assert torch.equal(pack_int32_rows(zeros, bits), pack_to_int32(signed_zeros, bits, packed_dim=0))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_symmetric_grid_values_are_what_a_reader_multiplying_in_the_scale_dtype_gets(dtype):
    w = torch.randn(4, 6, 64, generator=torch.Generator().manual_seed(1))
    grid = SymmetricGrid(4, scale_dtype=dtype, value_dtype=dtype)
    q = rtn_quantize(w, grid, 16)
    assert q.scale.dtype == getattr(torch, dtype) and q.zero is None
    assert int(q.codes.min()) >= 0 and int(q.codes.max()) <= 15
    assert torch.equal(dequantize_groups(grid, q.codes, q.scale, None, 16), q.dequantized)
    # compressed-tensors: (signed code in the scale's dtype) * scale, in the scale's dtype.
    signed = (q.codes.to(torch.int16) - 8).to(getattr(torch, dtype))
    scale = torch.repeat_interleave(q.scale, 16, dim=-1)
    assert torch.equal((signed * scale).float(), q.dequantized)
    # Every row's largest magnitude is at most half a step from its code.
    err = (w - q.dequantized).abs().amax(-1)
    assert bool((err <= 0.51 * q.scale.float().amax(-1) + 1e-3).all())


# ----------------------------------------------------------------------------- which format


@pytest.mark.parametrize(
    ("opts", "storage", "symmetric"),
    [
        ({"bits": 4, "group_size": 16}, "moetool", False),  # 16: not a group the servers' kernels take
        ({"bits": 4, "group_size": 0}, "compressed-tensors", True),
        ({"bits": 8, "group_size": 0}, "compressed-tensors", True),
        ({"bits": 3, "group_size": 0}, "moetool", False),
        ({"bits": 4, "group_size": 0, "symmetric": False}, "moetool", False),
        ({"bits": 3, "group_size": 0, "symmetric": True}, "moetool", True),
        ({"method": "nf4", "bits": 4, "group_size": 0}, "moetool", False),
        ({"ternary": True, "group_size": 0}, "moetool", False),
    ],
)
def test_auto_picks_compressed_tensors_where_it_fits(tiny, opts, storage, symmetric):
    from moetool.arch.dims import resolve_dims
    from moetool.arch.registry import family_for_config
    from moetool.quantize.formats import resolve
    from moetool.quantize.layout import build_layout

    options = QuantizeOptions(method=opts.pop("method", "rtn"), **opts)
    checkpoint = Checkpoint.open(tiny["mixtral"])
    spec = family_for_config(checkpoint.config)
    layout = build_layout(spec, resolve_dims(spec, checkpoint.config), checkpoint, options.categories)
    choice = resolve(options.output_format, options.symmetric, options.format(), layout, checkpoint)
    fmt = choice.fmt
    assert (choice.storage.name, fmt.symmetric, fmt.storage) == (storage, symmetric, storage), choice.reason
    if storage == "compressed-tensors":
        assert fmt.scale_dtype == fmt.value_dtype == "float32"  # the tiny model's dtype


def test_format_refusals(tiny, tmp_path):
    source = tiny["mixtral"]
    for opts, code in (
        ({"bits": 3, "group_size": 16, "output_format": "compressed-tensors"}, "FORMAT_UNFIT"),
        ({"bits": 4, "group_size": 20, "output_format": "compressed-tensors"}, "FORMAT_UNFIT"),  # 32 % 20
        ({"method": "nf4", "group_size": 16, "output_format": "compressed-tensors"}, "FORMAT_UNFIT"),
        ({"method": "nf4", "group_size": 16, "symmetric": True}, "SYMMETRY_INVALID"),
        ({"bits": 4, "output_format": "gguf"}, "FORMAT_INVALID"),
    ):
        with pytest.raises(UsageError) as info:
            quantize(source, tmp_path / "out", QuantizeOptions(method=opts.pop("method", "rtn"), **opts))
        assert info.value.code == code, opts
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- compressed-tensors outputs


@needs_ct
@pytest.mark.parametrize("family", FAMILIES)
def test_compressed_tensors_output_checks(ct_outputs, family):
    out, result = ct_outputs[family]
    passed = checks(result)
    assert passed["coverage"] and passed["exact"] and passed["compressed-tensors"]
    if family in PER_EXPERT:
        assert passed["transformers"] is True and "reload" not in passed
    else:  # fused on disk: transformers is tried, said to fail, and moetool's loader checked instead
        assert passed["transformers"] is None and passed["reload"] is True
        detail = next(c.detail for c in result.verification.checks if c.name == "transformers")
        assert "moetool.load_model" in detail and "missing" in detail
    config = json.loads((out / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed" and "transformers_weights" not in config
    weights = qc["config_groups"]["group_0"]["weights"]
    assert (weights["num_bits"], weights["symmetric"], weights["strategy"], weights["group_size"]) == (
        4,
        True,
        "group",
        16,
    )
    assert qc["ignore"][0] == "lm_head" and not any(re.search(r"experts\.\d+\.", name) for name in qc["ignore"])
    assert any(name.endswith("self_attn.q_proj") or name.endswith("self_attn.q_a_proj") for name in qc["ignore"])
    from compressed_tensors.quantization import QuantizationConfig

    QuantizationConfig.model_validate(qc)  # the reference library reads our block


@needs_ct
@pytest.mark.parametrize("family", FAMILIES)
def test_library_decompresses_exactly_what_moetool_loads(ct_outputs, family):
    """Independently of the quantize-time check: the library's decompression of every stored weight equals
    the weights moetool's own decoder reconstructs from the same files."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig

    import moetool
    from moetool.modeling import load_weights_transformers
    from moetool.quantize.loader import _config_for_moetool_quantizer, decoder_layers, register_with_transformers

    out, _ = ct_outputs[family]
    checkpoint = Checkpoint.open(out)
    scheme = next(
        iter(QuantizationConfig.model_validate(checkpoint.config["quantization_config"]).config_groups.values())
    )
    compressor = BaseCompressor.get_value_from_registry("pack-quantized")
    register_with_transformers()  # moetool's own decoder, even where transformers maps the family
    model = load_weights_transformers(
        checkpoint, dtype=torch.float32, device=torch.device("cpu"), config=_config_for_moetool_quantizer(checkpoint)
    )
    bases = sorted({n.rsplit(".", 1)[0] for n in checkpoint.tensors if n.endswith(".weight_packed")})
    assert bases
    by_layer: dict[int, list[str]] = {}
    for base in bases:
        by_layer.setdefault(int(base.split("layers.")[1].split(".")[0]), []).append(base)
    layers = decoder_layers(model)
    for layer, names in by_layer.items():
        experts = next(m for m in layers[layer].modules() if isinstance(m, QuantizedExperts))
        gate_up, down = experts.dequantize()
        i = experts.intermediate_dim
        for base in names:
            state = {
                s: checkpoint.read_tensor(f"{base}.{s}") for s in ("weight_packed", "weight_scale", "weight_shape")
            }
            weight = compressor.decompress(state, scheme)["weight"]
            e = int(base.split(".")[-2])
            proj = base.split(".")[-1]
            want = (
                down[e]
                if proj in ("w2", "down_proj")
                else gate_up[e, :i]
                if proj in ("w1", "gate_proj")
                else gate_up[e, i:]
            )
            assert torch.equal(weight.float(), want), base
    assert moetool  # imported for its loader registry


@needs_ct
@pytest.mark.parametrize(
    "family", ["mixtral", *(pytest.param(f, marks=pytest.mark.slow) for f in PER_EXPERT if f != "mixtral")]
)
def test_stock_transformers_loads_per_expert_families(ct_outputs, tiny, family):
    """A fresh interpreter without moetool: no missing or unexpected tensors, logits close to the original."""
    out, _ = ct_outputs[family]
    code = f"""
import torch
from transformers import AutoModelForCausalLM
from transformers.utils import logging
logging.set_verbosity_error()
q, info = AutoModelForCausalLM.from_pretrained({str(out)!r}, output_loading_info=True)
ref = AutoModelForCausalLM.from_pretrained({str(tiny[family])!r})
assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
ids = torch.randint(0, 100, (1, 16), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    a, b = q(ids).logits, ref(ids).logits
print("DIFF", float((a - b).abs().max()), float(b.abs().max()))
"""
    proc = run_stock(code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    diff, scale = (float(x) for x in proc.stdout.split("DIFF")[1].split())
    assert diff < 0.05 * max(1.0, scale)  # 4-bit codes of random weights: close, not equal


@needs_ct
def test_fused_family_fails_loudly_in_stock_transformers_and_loads_with_moetool(ct_outputs):
    from transformers import AutoModelForCausalLM

    import moetool

    out, _ = ct_outputs["granitemoe"]
    # Stock transformers (compressed-tensors is its own quantizer; moetool changes nothing there) does not
    # hide it: it reports the experts missing. Never a clean load.
    _, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] and info["unexpected_keys"]
    model = moetool.load_model(str(out), device="cpu")
    assert any(isinstance(m, QuantizedExperts) for m in model.modules())


@needs_ct
def test_bfloat16_model_gets_bfloat16_scales(tmp_path):
    """Scales in the model's dtype (what servers hold them in); values rounded the way readers compute."""
    source = tmp_path / "bf16"
    build_tiny("mixtral", tmp_path / "fp32").to(torch.bfloat16).save_pretrained(source)
    result = quantize(
        source, tmp_path / "q", QuantizeOptions(bits=4, method="rtn", group_size=16, output_format="compressed-tensors")
    )
    assert result.format.scale_dtype == "bfloat16" and all(checks(result).values())
    scales = [
        info.dtype for name, info in Checkpoint.open(tmp_path / "q").tensors.items() if name.endswith("weight_scale")
    ]
    assert scales and set(scales) == {"BF16"}


def test_compressed_tensors_loads_without_the_library(ct_outputs, monkeypatch):
    """moetool decodes compressed-tensors itself when the package is missing (and then says it skipped)."""
    import moetool
    from moetool.quantize.formats import ct_verify

    monkeypatch.setattr(ct_verify, "library_version", lambda: None)
    out, _ = ct_outputs["mixtral"]
    model = moetool.load_model(str(out), device="cpu")
    assert any(isinstance(m, QuantizedExperts) for m in model.modules())


def test_verification_says_what_it_skipped_without_the_library(tiny, tmp_path, monkeypatch):
    from moetool.quantize.formats import ct_verify

    monkeypatch.setattr(ct_verify, "library_version", lambda: None)
    opts = QuantizeOptions(bits=8, method="rtn", group_size=0)
    result = quantize(tiny["qwen3_moe"], tmp_path / "q", opts)
    assert result.format.storage == "compressed-tensors"
    details = {c.name: (c.passed, c.detail) for c in result.verification.checks}
    assert details["compressed-tensors"][0] is None and "not installed" in details["compressed-tensors"][1]
    assert details["transformers"][0] is None and details["reload"][0] is True


# ----------------------------------------------------------------------------- moetool's format in stock transformers


GUARD_PROBE = """
import sys
import torch
from transformers import AutoModelForCausalLM
for kwargs in ({{}}, {{"ignore_mismatched_sizes": True, "dtype": torch.float32}}):
    try:
        AutoModelForCausalLM.from_pretrained({out!r}, **kwargs)
        print("LOADED")
    except Exception as exc:
        print("REFUSED", type(exc).__name__, "moetool.load_model" in str(exc))
# After `import moetool.quantize`, plain from_pretrained loads it with nothing missing or unexpected.
sys.path.insert(0, {root!r})
import moetool.quantize
_, info = AutoModelForCausalLM.from_pretrained({out!r}, output_loading_info=True)
print("PROBLEMS", sum(len(v) for k, v in info.items() if k != "error_msgs"))
"""


@pytest.mark.parametrize("family", ["mixtral", pytest.param("granitemoe", marks=pytest.mark.slow)])
def test_moetool_format_never_loads_random_experts_in_stock_transformers(tiny, tmp_path, family):
    out = tmp_path / "q"
    quantize(tiny[family], out, QuantizeOptions(bits=3, method="rtn", group_size=16), verify=False)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "moetool"
    proc = run_stock(GUARD_PROBE.format(out=str(out), root=str(ROOT)))
    assert proc.stdout.split().count("LOADED") == 0, proc.stdout
    assert proc.stdout.count("REFUSED ValueError True") == 2, proc.stdout + proc.stderr[-2000:]
    assert "PROBLEMS 0" in proc.stdout, proc.stderr[-2000:]


# ----------------------------------------------------------------------------- export


@needs_ct
@pytest.mark.parametrize("family", ["mixtral", pytest.param("granitemoe", marks=pytest.mark.slow)])
def test_export_keeps_the_codes(tiny, tmp_path, family):
    import moetool
    from moetool.quantize.export import export
    from moetool.quantize.loader import decoder_layers

    source = tmp_path / "moetool-format"
    opts = QuantizeOptions(bits=4, method="rtn", group_size=16, output_format="moetool", symmetric=True)
    quantize(tiny[family], source, opts, verify=False)
    result = export(source, tmp_path / "ct")
    passed = checks(result)
    assert passed["coverage"] and passed["compressed-tensors"]
    assert passed["transformers"] is (True if family == "mixtral" else None)
    a = decoder_layers(moetool.load_model(str(source), device="cpu"))
    b = decoder_layers(moetool.load_model(str(tmp_path / "ct"), device="cpu"))
    for index, layer in a.items():
        experts = next((m for m in layer.modules() if isinstance(m, QuantizedExperts)), None)
        if experts is None:
            continue
        other = b[index].get_submodule("block_sparse_moe.experts" if family == "granitemoe" else "mlp.experts")
        weights = other.dequantize() if isinstance(other, QuantizedExperts) else (other.gate_up_proj, other.down_proj)
        for mine, theirs in zip(experts.dequantize(), weights, strict=True):
            assert torch.equal(mine, theirs.float())


def test_export_refusals(tiny, tmp_path, ct_outputs):
    from moetool.quantize.export import export

    asym = tmp_path / "asym"
    quantize(tiny["mixtral"], asym, QuantizeOptions(bits=4, method="rtn", group_size=16), verify=False)
    with pytest.raises(CheckpointError) as info:
        export(asym, tmp_path / "a")
    assert info.value.code == "EXPORT_UNFIT" and "asymmetric" in info.value.message
    for source in (tiny["mixtral"], ct_outputs["mixtral"][0]):
        with pytest.raises(CheckpointError) as info:
            export(source, tmp_path / "b")
        assert info.value.code == "NOT_MOETOOL_FORMAT"
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ----------------------------------------------------------------------------- CLI


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1", "COLUMNS": "120", "OMP_NUM_THREADS": "1"}
    env.pop("MOETOOL_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "moetool", *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )


def invoke(*args: str):
    from typer.testing import CliRunner

    from moetool.cli import app

    return CliRunner().invoke(app, list(args))


def test_cli_format_and_export(tiny, tmp_path):
    bad = run_cli(
        "quantize",
        str(tiny["mixtral"]),
        "-o",
        str(tmp_path / "x"),
        "--method",
        "rtn",
        "--bits",
        "3",
        "--format",
        "compressed-tensors",
    )
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    lines = [line for line in bad.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "compressed-tensors" in lines[0]
    assert not (tmp_path / "x").exists()
    made = invoke(
        "quantize",
        str(tiny["mixtral"]),
        "-o",
        str(tmp_path / "m"),
        "--method",
        "rtn",
        "--bits",
        "4",
        "--group-size",
        "16",
        "--sym",
        "--json",
    )
    assert made.exit_code == 0, made.output
    doc = json.loads(made.stdout)
    assert doc["format"]["name"] == "moetool" and doc["options"]["symmetric"] is True
    exported = invoke("export", str(tmp_path / "m"), "-o", str(tmp_path / "ct"), "--json")
    assert exported.exit_code == 0, exported.output
    doc = json.loads(exported.stdout)
    assert doc["format"] == "compressed-tensors" and doc["verification"]["passed"]
    refused = invoke("export", str(tiny["mixtral"]), "-o", str(tmp_path / "y"))
    assert refused.exit_code == 1 and "not quantized" in refused.output and not (tmp_path / "y").exists()


# ----------------------------------------------------------------------------- bitsandbytes' NF4 kernel


def test_bitsandbytes_nf4_dequantization_is_moetools():
    """The loader's bitsandbytes path (used on CUDA) gives exactly moetool's NF4 weights; checked on the CPU."""
    from moetool.quantize import bnb
    from moetool.quantize.nf4 import nf4_quantize
    from moetool.quantize.pack import pack_bits

    w = torch.randn(3, 16, 256, generator=torch.Generator().manual_seed(0))
    q = nf4_quantize(w, 64)
    codes = pack_bits(q.codes, 4)
    assert not bnb.usable(codes, 256, 64)  # CPU tensors keep moetool's own code path
    assert not bnb.usable(codes, 250, 64, cpu=True) and not bnb.usable(codes, 256, 16, cpu=True)
    if not bnb.usable(codes, 256, 64, cpu=True):
        pytest.skip("bitsandbytes is not installed")
    assert torch.equal(bnb.dequantize_nf4(codes, q.scale, 256, 64), q.dequantized)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nf4_model_on_cuda_dequantizes_with_bitsandbytes(tmp_path, monkeypatch):
    import moetool
    from moetool.quantize import bnb

    source, out = tmp_path / "wide", tmp_path / "nf4"
    build_tiny("mixtral", source, hidden_size=64, intermediate_size=128)  # rows of whole 64-blocks
    quantize(source, out, QuantizeOptions(method="nf4", group_size=64), verify=False)
    calls = []
    original = bnb.dequantize_nf4
    monkeypatch.setattr(bnb, "dequantize_nf4", lambda *a: calls.append(1) or original(*a))
    ids = torch.randint(0, 100, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cpu = moetool.load_model(str(out), device="cpu")(ids).logits
        gpu = moetool.load_model(str(out), device="cuda", dtype="float32")(ids.cuda()).logits.cpu()
    assert calls and torch.allclose(cpu, gpu, atol=1e-4)
