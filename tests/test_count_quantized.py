"""Quantized storage counts logical parameters; scales are storage, not parameters."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moetool.count.params import count_from_checkpoint, count_from_config
from moetool.io.checkpoint import Checkpoint
from tests.tiny import build_tiny, stored_numel


def _rewrite(path: Path, transform, quantization_config: dict) -> None:
    tensors = load_file(path / "model.safetensors")
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        out.update(transform(name, tensor))
    save_file(out, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (path / "config.json").write_text(json.dumps(config))


def test_mxfp4_experts_unpacked(tmp_path):
    """gpt-oss stores experts as MXFP4: uint8 blocks of 2 values per byte plus uint8 block scales."""
    model = build_tiny("gpt_oss", tmp_path, intermediate_size=64)
    expected = stored_numel(model)

    def to_mxfp4(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        if not name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            return {name: tensor}
        experts, rows, cols = tensor.shape
        # Hub layout: [E, out, in/32, 16] blocks (32 fp4 values in 16 bytes) and [E, out, in/32] scales.
        out_dim, in_dim = cols, rows
        blocks = torch.zeros(experts, out_dim, in_dim // 32, 16, dtype=torch.uint8)
        scales = torch.zeros(experts, out_dim, in_dim // 32, dtype=torch.uint8)
        return {f"{name}_blocks": blocks, f"{name}_scales": scales}

    _rewrite(tmp_path, to_mxfp4, {"quant_method": "mxfp4"})
    report = count_from_checkpoint(Checkpoint.open(tmp_path))
    assert report.quantization == "mxfp4"
    assert report.total_params == expected
    assert report.total_params == count_from_config(Checkpoint.open(tmp_path).config).total_params
    assert report.storage_only_bytes > 0
    assert "U8" in report.dtype_bytes
    assert not any("heuristics" in w for w in report.warnings)


def test_fp8_scale_inv_is_storage(tmp_path):
    """DeepSeek-V3 stores FP8 weights with one F32 scale per 128x128 block: scales are not parameters."""
    model = build_tiny("deepseek_v3", tmp_path)
    expected = stored_numel(model)

    def to_fp8(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        if tensor.ndim != 2 or "embed" in name or "lm_head" in name or "mlp.gate." in name:
            return {name: tensor}
        rows, cols = tensor.shape
        scale = torch.ones(math.ceil(rows / 128), math.ceil(cols / 128), dtype=torch.float32)
        return {name: tensor.to(torch.float8_e4m3fn), f"{name}_scale_inv": scale}

    _rewrite(tmp_path, to_fp8, {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]})
    report = count_from_checkpoint(Checkpoint.open(tmp_path))
    assert report.total_params == expected
    assert report.dtype_bytes["F8_E4M3"] > 0
    assert report.storage_only_bytes == 4 * sum(
        1 for name in Checkpoint.open(tmp_path).tensors if name.endswith("weight_scale_inv")
    )


def test_gptq_qweight_unpacked(tmp_path):
    """GPTQ packs 8 int4 values into each int32 of ``qweight``; qzeros, scales and g_idx are storage."""
    model = build_tiny("mixtral", tmp_path)
    expected = stored_numel(model)

    def to_gptq(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        if ".experts." not in name:
            return {name: tensor}
        base = name[: -len(".weight")]
        out_dim, in_dim = tensor.shape
        group = 16
        return {
            f"{base}.qweight": torch.zeros(in_dim // 8, out_dim, dtype=torch.int32),
            f"{base}.qzeros": torch.zeros(in_dim // group, out_dim // 8, dtype=torch.int32),
            f"{base}.scales": torch.zeros(in_dim // group, out_dim, dtype=torch.float16),
            f"{base}.g_idx": torch.zeros(in_dim, dtype=torch.int32),
        }

    _rewrite(tmp_path, to_gptq, {"quant_method": "gptq", "bits": 4, "group_size": 16})
    report = count_from_checkpoint(Checkpoint.open(tmp_path))
    assert report.quantization == "gptq"
    assert report.total_params == expected
    assert report.active_params == count_from_config(Checkpoint.open(tmp_path).config).active_params
    assert not any("heuristics" in w for w in report.warnings)


def test_compressed_tensors_weight_packed(tmp_path):
    model = build_tiny("qwen3_moe", tmp_path)
    expected = stored_numel(model)

    def to_packed(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        if ".experts." not in name:
            return {name: tensor}
        base = name[: -len(".weight")]
        out_dim, in_dim = tensor.shape
        return {
            f"{base}.weight_packed": torch.zeros(out_dim, in_dim // 8, dtype=torch.int32),
            f"{base}.weight_scale": torch.zeros(out_dim, in_dim // 8, dtype=torch.bfloat16),
            f"{base}.weight_shape": torch.tensor([out_dim, in_dim], dtype=torch.int64),
        }

    quant = {"quant_method": "compressed-tensors", "config_groups": {"group_0": {"weights": {"num_bits": 4}}}}
    _rewrite(tmp_path, to_packed, quant)
    report = count_from_checkpoint(Checkpoint.open(tmp_path))
    assert report.total_params == expected
