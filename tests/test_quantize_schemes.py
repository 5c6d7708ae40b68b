"""The quantization scheme and method registries: every registered scheme stores and decodes its codes
exactly and round-trips its config; every method is reachable; fp4 (E2M1) codes, added through the
registry, round as the OCP specification says and quantize a tiny model end to end."""

from __future__ import annotations

import json

import pytest
import torch

from moetool.errors import UsageError
from moetool.quantize import QuantFormat, QuantizeOptions, quantize
from moetool.quantize.grids import dequantize_groups
from moetool.quantize.methods import METHODS
from moetool.quantize.pack import unpack_bits
from moetool.quantize.rtn import rtn_quantize
from moetool.quantize.schemes import SCHEMES
from moetool.quantize.schemes.fp4 import FP4Grid
from moetool.quantize.storage import decode_weight, encode_weight
from tests.helpers import make_tokenizer
from tests.tiny import build_tiny

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", list(SCHEMES))
@pytest.mark.parametrize("group_size", [0, 16])
def test_every_scheme_stores_and_decodes_exactly(name, group_size):
    scheme = SCHEMES[name]
    fmt = QuantFormat(name, scheme.request_bits(None, "rtn"), group_size)
    assert QuantFormat.from_config(fmt.to_config()) == fmt
    weight = torch.randn(3, 8, 40, generator=torch.Generator().manual_seed(1))
    q = rtn_quantize(weight, fmt.grid(), group_size)
    stored = encode_weight(q, fmt)
    packed = decode_weight(stored.__getitem__, fmt, tuple(weight.shape), "w.weight")
    codes = unpack_bits(packed.codes, packed.code_bits, packed.columns)
    assert torch.equal(codes, q.codes)
    decoded = dequantize_groups(fmt.grid(), codes, packed.scale, packed.zero, group_size)
    assert torch.equal(decoded, q.dequantized)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_is_reachable(name):
    fmt = QuantizeOptions(method=name, group_size=32).format()
    assert fmt.method == name and fmt.scheme in SCHEMES
    assert fmt.label.endswith("g32")


def test_fp4_rounds_to_the_nearest_e2m1_value_ties_to_even():
    grid = FP4Grid()
    row = [6.0, 5.0, -5.0, 0.25, -0.25, 0.75, 1.25, 1.75, 2.5, 3.5, -6.0, 0.1, -0.3, 2.9, -4.4, 1.4]
    q = rtn_quantize(torch.tensor([row]), grid, 0)
    assert float(q.scale) == 1.0  # absmax 6 over the largest E2M1 value
    want = [6, 4, -4, 0, 0, 1, 1, 2, 2, 4, -6, 0, -0.5, 3, -4, 1.5]
    assert q.dequantized[0].tolist() == want
    # Sign bit 8, the magnitude's index below it; no negative zero.
    assert q.codes[0].tolist() == [7, 6, 14, 0, 0, 2, 2, 4, 4, 6, 15, 0, 9, 5, 14, 3]
    assert torch.equal(dequantize_groups(grid, q.codes, q.scale, None, 0), q.dequantized)


def test_fp4_refusals():
    with pytest.raises(UsageError, match="4-bit codes"):
        QuantizeOptions(method="fp4", bits=3)
    with pytest.raises(UsageError, match="exclude each other"):
        QuantizeOptions(method="fp4", ternary=True)
    with pytest.raises(UsageError) as info:
        QuantizeOptions(method="fp4", symmetric=True)
    assert info.value.code == "SYMMETRY_INVALID"


def test_fp4_end_to_end(tmp_path):
    source = tmp_path / "mixtral"
    build_tiny("mixtral", source)
    make_tokenizer(path=source)
    with pytest.raises(UsageError) as info:
        quantize(
            source, tmp_path / "ct", QuantizeOptions(method="fp4", group_size=16, output_format="compressed-tensors")
        )
    assert info.value.code == "FORMAT_UNFIT"
    result = quantize(source, tmp_path / "q", QuantizeOptions(method="fp4", group_size=16))
    assert result.format.storage == "moetool" and result.format.label == "fp4 g16"
    assert result.verification is not None and all(c.passed is not False for c in result.verification.checks)
    assert 4.0 < result.expert_bits < 5.5
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert (config["scheme"], config["bits"], config["method"]) == ("fp4", 4, "fp4")
