"""Unit tests of moetool.quantize's building blocks: packing, the ternary codec, grids, RTN, NF4, GPTQ, storage.

No model is loaded here; every test runs in well under a second.
"""

from __future__ import annotations

import pytest
import torch

from moetool.errors import CheckpointError, ConfigError
from moetool.quantize.codec import decode_trits, encode_trits, stream_count
from moetool.quantize.gptq import GPTQStats, gptq_quantize
from moetool.quantize.grids import NF4_VALUES, NF4Grid, TernaryGrid, UniformGrid, dequantize_groups, group_bounds
from moetool.quantize.nf4 import bitsandbytes_nf4, nf4_quantize
from moetool.quantize.pack import pack_bits, pack_trits, packed_size, unpack_bits, unpack_trits
from moetool.quantize.rtn import rtn_quantize
from moetool.quantize.storage import QuantFormat, decode_weight, encode_weight

# ----------------------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 3, 7, 8, 9, 13, 64, 160, 257])
def test_pack_unpack_exact(bits, n):
    gen = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 1 << bits, (2, 3, n), generator=gen, dtype=torch.int64)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (2, 3, packed_size(n, bits))
    assert torch.equal(unpack_bits(packed, bits, n).long(), codes)
    # Rows are packed independently: slicing packed rows equals packing the slice.
    assert torch.equal(pack_bits(codes[1, 2], bits), packed[1, 2])


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pack_bit_order_is_little_endian(bits):
    # Code i occupies bits i*b .. i*b+b-1 of the row's bit string.
    codes = torch.tensor([1, 0, 0, 0, 0, 0, 0, (1 << bits) - 1])
    packed = pack_bits(codes, bits)
    bitstring = "".join(format(int(byte), "08b")[::-1] for byte in packed)
    expected = "".join(format(int(c), f"0{bits}b")[::-1] for c in codes)
    assert bitstring[: len(expected)] == expected
    assert set(bitstring[len(expected) :]) <= {"0"}


def test_pack_refuses_codes_out_of_range():
    with pytest.raises(ValueError):
        pack_bits(torch.tensor([0, 4]), 2)
    with pytest.raises(ValueError):
        pack_bits(torch.tensor([-1]), 3)
    with pytest.raises(ValueError):
        pack_bits(torch.tensor([1]), 9)
    with pytest.raises(ValueError):
        unpack_bits(torch.zeros(2, dtype=torch.uint8), 4, 5)


@pytest.mark.parametrize("n", [0, 1, 4, 5, 6, 999, 1000])
def test_trits_base3_exact(n):
    trits = torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(n))
    packed = pack_trits(trits)
    assert packed.numel() == (n + 4) // 5
    assert packed.numel() == 0 or int(packed.max()) <= 242
    assert torch.equal(unpack_trits(packed, n).long(), trits)


# ----------------------------------------------------------------------------- ternary codec


def ternary_codes(n: int, zero_fraction: float, seed: int = 0) -> torch.Tensor:
    u = torch.rand(n, generator=torch.Generator().manual_seed(seed))
    side = (1 - zero_fraction) / 2
    return torch.where(u < zero_fraction, 1, torch.where(u < zero_fraction + side, 0, 2)).to(torch.uint8)


@pytest.mark.parametrize("n", [0, 1, 5, 6, 4097, 40960])
def test_codec_round_trip_exact(n):
    codes = ternary_codes(n, 0.8, seed=n)
    stream = encode_trits(codes)
    assert stream_count(stream) == n
    assert torch.equal(decode_trits(stream, n), codes)


def test_codec_goes_below_one_bit_when_codes_are_mostly_zero():
    import math

    n = 200_000
    p0 = 0.85
    codes = ternary_codes(n, p0)
    entropy = -(p0 * math.log2(p0) + (1 - p0) * math.log2((1 - p0) / 2))
    bits = 8 * len(encode_trits(codes)) / n
    assert bits < 1.0
    assert bits < entropy * 1.06  # within a few percent of the order-0 entropy


def test_codec_rejects_corrupt_streams():
    codes = ternary_codes(5000, 0.8)
    stream = encode_trits(codes)
    bad = [
        stream[:-1],  # truncated
        stream + b"\x00",  # trailing bytes
        stream[:10],  # shorter than the header
        b"XXXX" + stream[4:],  # magic
        stream[:4] + b"\x09" + stream[5:],  # version
        stream[:40] + bytes([stream[40] ^ 0x10]) + stream[41:],  # payload bit flip (CRC or LZMA)
    ]
    for data in bad:
        with pytest.raises(CheckpointError) as info:
            decode_trits(data)
        assert info.value.code == "QUANT_STREAM_INVALID"
    with pytest.raises(CheckpointError):
        decode_trits(stream, 5001)


# ----------------------------------------------------------------------------- grids, RTN, NF4


def test_group_bounds_allow_a_short_last_group():
    assert group_bounds(160, 64) == [(0, 64), (64, 128), (128, 160)]
    assert group_bounds(160, 0) == [(0, 160)]
    assert group_bounds(160, 500) == [(0, 160)]
    assert group_bounds(256, 64) == [(0, 64), (64, 128), (128, 192), (192, 256)]


@pytest.mark.parametrize(
    "grid", [UniformGrid(2), UniformGrid(3), UniformGrid(4), UniformGrid(8), UniformGrid(3, clip_search=True)]
)
@pytest.mark.parametrize("group", [0, 32, 50])
def test_rtn_codes_decode_to_its_weights(grid, group):
    w = torch.randn(3, 20, 100, generator=torch.Generator().manual_seed(0))
    q = rtn_quantize(w, grid, group)
    assert int(q.codes.max()) < 1 << grid.bits
    assert q.scale.dtype == torch.float16 and q.zero is not None
    assert q.scale.shape == (3, 20, len(group_bounds(100, group)))
    assert torch.equal(dequantize_groups(grid, q.codes, q.scale, q.zero, group), q.dequantized)
    # Round to nearest: inside the range no weight is off by more than half a step; at its ends the
    # integer zero point can shift the grid by up to another half step.
    step = torch.repeat_interleave(q.scale.float(), torch.tensor([e - s for s, e in group_bounds(100, group)]), dim=-1)
    if not grid.clip_search:
        error = (w - q.dequantized).abs()
        assert bool((error <= step * (1 + 1e-3)).all())
        assert float((error <= 0.5 * step * (1 + 1e-3)).float().mean()) > 0.95


def test_more_bits_less_error():
    w = torch.randn(4, 64, 128, generator=torch.Generator().manual_seed(1))
    errors = [float((rtn_quantize(w, UniformGrid(b), 64).dequantized - w).pow(2).mean()) for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 1e-4


def test_nf4_is_nearest_code_value():
    assert len(NF4_VALUES) == 16 and NF4_VALUES[0] == -1.0 and NF4_VALUES[7] == 0.0 and NF4_VALUES[15] == 1.0
    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(2))
    q = nf4_quantize(w, 64)
    values = torch.tensor(NF4_VALUES)
    scale = torch.repeat_interleave(q.scale.float(), 64, dim=-1)
    nearest = (w.unsqueeze(-1) / scale.unsqueeze(-1) - values).abs().argmin(-1)
    assert torch.equal(q.codes.long(), nearest)
    assert torch.equal(dequantize_groups(NF4Grid(), q.codes, q.scale, None, 64), q.dequantized)
    # The group's absmax is represented exactly (up to float16 rounding of the scale).
    assert torch.allclose(q.dequantized.abs().amax(-1), w.abs().amax(-1), rtol=1e-3)


def test_nf4_matches_bitsandbytes_when_installed():
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(3))
    reference = bitsandbytes_nf4(w, 64)
    if reference is None:
        pytest.skip("bitsandbytes is not installed")
    codes, dequantized = reference
    ours = nf4_quantize(w, 64)
    # Scales differ only by float16 rounding: codes agree except at (rare) exact ties.
    assert float((ours.codes == codes).float().mean()) > 0.999
    assert torch.allclose(ours.dequantized, dequantized, atol=2e-3 * float(w.abs().max()))


def test_ternary_grid_codes():
    w = torch.randn(4, 32, 64, generator=torch.Generator().manual_seed(4))
    q = rtn_quantize(w, TernaryGrid(), 0)
    assert set(q.codes.unique().tolist()) <= {0, 1, 2}
    assert torch.equal(dequantize_groups(TernaryGrid(), q.codes, q.scale, None, 0), q.dequantized)
    # With the absmax as scale, most codes are zero, and the largest weight of each row is kept.
    assert float((q.codes == 1).float().mean()) > 0.5
    assert torch.allclose(q.dequantized.abs().amax(-1), w.abs().amax(-1), rtol=1e-3)


# ----------------------------------------------------------------------------- GPTQ


def layer_problem(e: int = 4, rows: int = 48, columns: int = 96, tokens: int = 1500, seed: int = 0):
    """Weights and correlated inputs, as real activations are (a few directions dominate)."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(e, rows, columns, generator=gen) * 0.05
    mix = torch.randn(columns, columns, generator=gen) * 0.3 + torch.eye(columns)
    x = torch.randn(e, tokens, columns, generator=gen) @ mix
    return weight, x, x.transpose(1, 2) @ x


def output_error(x: torch.Tensor, weight: torch.Tensor, quantized: torch.Tensor) -> float:
    return float((x @ (weight - quantized).transpose(1, 2)).pow(2).sum())


@pytest.mark.parametrize(
    "grid",
    [UniformGrid(4), UniformGrid(3), UniformGrid(2), UniformGrid(2, clip_search=True), NF4Grid(), TernaryGrid()],
    ids=["w4", "w3", "w2", "w2-clip", "nf4", "ternary"],
)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_the_same_inputs(grid, act_order):
    weight, x, hessian = layer_problem()
    rtn = rtn_quantize(weight, grid, 32)
    stats = GPTQStats()
    gptq = gptq_quantize(weight, hessian, grid, 32, act_order=act_order, stats=stats)
    # Ternary groups re-fitted on GPTQ-updated weights gain least (their absmax grows with the updates).
    margin = 0.99 if grid.kind == "ternary" and not act_order else 0.8
    assert output_error(x, weight, gptq.dequantized) < margin * output_error(x, weight, rtn.dequantized)
    # The codes decode to the weights GPTQ fed forward, in the original column order.
    assert torch.equal(dequantize_groups(grid, gptq.codes, gptq.scale, gptq.zero, 32), gptq.dequantized)
    assert stats.proxy_error and all(v >= 0 for v in stats.proxy_error)


def test_gptq_with_identity_hessian_is_rtn():
    weight, _, _ = layer_problem()
    identity = torch.eye(weight.shape[-1]).expand(weight.shape[0], -1, -1)
    for group in (0, 32, 40):
        gptq = gptq_quantize(weight, identity, UniformGrid(3), group)
        rtn = rtn_quantize(weight, UniformGrid(3), group)
        assert torch.equal(gptq.codes, rtn.codes)
        assert torch.equal(gptq.dequantized, rtn.dequantized)


def test_gptq_batched_equals_one_expert_at_a_time():
    weight, _, hessian = layer_problem(e=5)
    for act_order in (False, True):
        batched = gptq_quantize(weight, hessian, UniformGrid(4), 32, act_order=act_order)
        for e in range(weight.shape[0]):
            single = gptq_quantize(weight[e : e + 1], hessian[e : e + 1], UniformGrid(4), 32, act_order=act_order)
            assert torch.equal(single.codes, batched.codes[e : e + 1])
            assert torch.allclose(single.dequantized, batched.dequantized[e : e + 1], atol=1e-6)


def test_gptq_survives_dead_columns_and_singular_hessians():
    weight, _, hessian = layer_problem(e=3)
    hessian[0, :, 5] = 0
    hessian[0, 5, :] = 0  # an input no token touched
    hessian[1] = 0  # an expert no token reached at all
    hessian[2] = hessian[2, :1].T @ hessian[2, :1]  # rank one
    stats = GPTQStats()
    q = gptq_quantize(weight, hessian, UniformGrid(4), 32, stats=stats)
    assert torch.isfinite(q.dequantized).all()
    assert stats.dead_columns[0] >= 1 and stats.dead_columns[1] == weight.shape[-1]
    # An all-zero Hessian leaves nothing to balance: round to nearest.
    assert torch.equal(q.codes[1], rtn_quantize(weight[1:2], UniformGrid(4), 32).codes[0])


def test_gptq_refuses_mismatched_shapes():
    weight, _, hessian = layer_problem(e=2)
    with pytest.raises(ValueError):
        gptq_quantize(weight, hessian[:1], UniformGrid(4), 32)
    with pytest.raises(ValueError):
        gptq_quantize(weight[0], hessian[0], UniformGrid(4), 32)


# ----------------------------------------------------------------------------- storage


@pytest.mark.parametrize(
    "fmt",
    [
        QuantFormat("uniform", 2, 32),
        QuantFormat("uniform", 3, 32),
        QuantFormat("uniform", 4, 0),
        QuantFormat("uniform", 8, 50),
        QuantFormat("nf4", 4, 32),
        QuantFormat("ternary", None, 0),
    ],
    ids=lambda f: f.label,
)
def test_storage_round_trip(fmt):
    from moetool.quantize.pack import unpack_bits

    weight = torch.randn(3, 16, 100, generator=torch.Generator().manual_seed(5))
    grid = fmt.grid()
    q = rtn_quantize(weight, grid, fmt.group_size)
    stored = encode_weight(q, fmt)
    assert set(stored) == ({"qweight", "qscale", "qzero"} if fmt.scheme == "uniform" else {"qweight", "qscale"})
    packed = decode_weight(lambda suffix: stored[suffix], fmt, tuple(weight.shape), "x.weight")
    codes = unpack_bits(packed.codes, packed.code_bits, 100)
    assert torch.equal(codes, q.codes)
    assert torch.equal(dequantize_groups(grid, codes, packed.scale, packed.zero, fmt.group_size), q.dequantized)
    if fmt.scheme != "ternary":
        assert stored["qweight"].shape == (3, 16, packed_size(100, fmt.bits))
    with pytest.raises(CheckpointError):
        decode_weight(lambda suffix: stored[suffix], fmt, (3, 15, 100), "x.weight")


def test_quant_format_config_round_trip_and_validation():
    fmt = QuantFormat("uniform", 3, 64, ("routed_experts", "attention"), "gptq", {"act_order": True})
    config = fmt.to_config()
    assert config["quant_method"] == "moetool" and config["bits"] == 3 and config["zero_point"] is True
    back = QuantFormat.from_config(config)
    assert back == fmt
    assert QuantFormat.from_config(QuantFormat("ternary", None, 0).to_config()).codec == "lzma2-base3"
    symmetric = QuantFormat("uniform", 4, 32, symmetric=True)
    sym_config = symmetric.to_config()
    assert sym_config["format_version"] == 2 and sym_config["zero_point"] is False
    assert QuantFormat.from_config(sym_config) == symmetric
    for broken in (
        {**config, "bits": 5},
        {**config, "format_version": 3},
        {**config, "symmetric": True},  # symmetric codes are format_version 2 and have no zero point
        {**config, "format_version": 2, "symmetric": True},
        {**config, "scheme": "fp4"},
        {**config, "group_size": -1},
        {**config, "quant_method": "gptq"},
        {**QuantFormat("nf4", 4, 64).to_config(), "bits": 3},
        {**QuantFormat("ternary", None, 0).to_config(), "codec": None},
    ):
        with pytest.raises(ConfigError) as info:
            QuantFormat.from_config(broken)
        assert info.value.code == "QUANT_CONFIG_INVALID"


# ----------------------------------------------------------------------------- ternary under a bit budget


def test_ternary_stored_size_is_what_the_codec_writes():
    from moetool.quantize.engine import stored_ternary_bits

    weight = torch.randn(3, 128, 256, generator=torch.Generator().manual_seed(6))
    q = rtn_quantize(weight, TernaryGrid(scale_factor=1.5), 0)
    bits = stored_ternary_bits(q.codes, 1, streams=2)
    for e in range(3):
        stored = len(encode_trits(q.codes[e, :64])) + len(encode_trits(q.codes[e, 64:])) + 2 * 128
        assert float(bits[e]) == pytest.approx(8 * stored / q.codes[e].numel())


@pytest.mark.parametrize("with_hessian", [False, True])
def test_ternary_to_rate_fits_the_budget(with_hessian):
    from moetool.quantize import QuantizeOptions
    from moetool.quantize.engine import quantize_ternary_to_rate, stored_ternary_bits

    weight, x, hessian = layer_problem(e=4, rows=64, columns=128)
    errors = []
    for budget in (0.9, 1.1, 1.4):
        opts = QuantizeOptions(ternary=True, group_size=0, ternary_bits=budget)
        q = quantize_ternary_to_rate(weight, hessian if with_hessian else None, opts)
        assert bool((stored_ternary_bits(q.codes, 1) <= budget).all())
        assert torch.equal(dequantize_groups(TernaryGrid(), q.codes, q.scale, None, 0), q.dequantized)
        errors.append(output_error(x, weight, q.dequantized))
    assert errors[0] >= errors[1] >= errors[2]  # more bits, less error
