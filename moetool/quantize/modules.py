"""Modules that hold packed codes and dequantize on the fly: the routed experts and plain linears.

:class:`QuantizedExperts` replaces a transformers v5 experts module (``gate_up_proj [E, 2I, H]``,
``down_proj [E, H, I]``, called as ``experts(hidden_states, top_k_index, top_k_weights)``) and computes
the same thing: for each expert that received tokens it unpacks and dequantizes that expert's two
matrices, runs ``down(act(gate) * up)`` on its tokens and adds the result weighted by the routing
weight. Memory holds the packed codes plus one expert's full-precision weights at a time.
:class:`QuantizedLinear` does the same for an ``nn.Linear`` (attention, shared experts).

The codes stay packed in memory (2 bits per ternary code); :meth:`QuantizedExperts.dequantize` and
:meth:`QuantizedLinear.dequantize` give full-precision weights for checks or conversions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moetool.quantize.storage import PackedWeight, QuantFormat


def _dequantize(
    fmt: QuantFormat, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, columns: int
) -> torch.Tensor:
    return fmt.spec.dequantize(fmt, codes, scale, zero, bits, columns)


class _PackedHolder(nn.Module):
    """Buffers of one or more packed weights (non-persistent: the format is not transformers' own)."""

    def __init__(self, fmt: QuantFormat) -> None:
        super().__init__()
        self.fmt = fmt
        self._bits: dict[str, int] = {}
        self._columns: dict[str, int] = {}

    def _store(self, prefix: str, weight: PackedWeight) -> None:
        self.register_buffer(f"{prefix}_codes", weight.codes.contiguous(), persistent=False)
        self.register_buffer(f"{prefix}_scale", weight.scale.contiguous(), persistent=False)
        zero = None if weight.zero is None else weight.zero.contiguous()
        self.register_buffer(f"{prefix}_zero", zero, persistent=False)
        self._bits[prefix] = weight.code_bits
        self._columns[prefix] = weight.columns

    def _weight(self, prefix: str, index: Any = None) -> torch.Tensor:
        codes = getattr(self, f"{prefix}_codes")
        scale = getattr(self, f"{prefix}_scale")
        zero = getattr(self, f"{prefix}_zero")
        if codes is None:
            raise RuntimeError(f"{type(self).__name__}: the quantized weights were never loaded")
        if index is not None:
            codes, scale = codes[index], scale[index]
            zero = None if zero is None else zero[index]
        return _dequantize(self.fmt, codes, scale, zero, self._bits[prefix], self._columns[prefix])

    def packed_bytes(self) -> int:
        """Bytes of codes, scales and zero points held in memory."""
        return sum(b.numel() * b.element_size() for b in self.buffers())


class QuantizedExperts(_PackedHolder):
    """A layer's routed experts as packed codes, dequantized per expert in ``forward``.

    Args:
        num_experts / hidden_dim / intermediate_dim: E, H and I.
        act_fn: the activation of the original experts module.
        fmt: the checkpoint's quantization format.
    """

    def __init__(
        self, num_experts: int, hidden_dim: int, intermediate_dim: int, act_fn: nn.Module, fmt: QuantFormat
    ) -> None:
        super().__init__(fmt)
        self.num_experts = num_experts
        self.hidden_dim = hidden_dim
        self.intermediate_dim = intermediate_dim
        self.act_fn = act_fn
        for prefix in ("gate_up", "down"):
            for part in ("codes", "scale", "zero"):
                self.register_buffer(f"{prefix}_{part}", None, persistent=False)

    @classmethod
    def like(cls, original: nn.Module, fmt: QuantFormat) -> QuantizedExperts:
        """An empty module with the dimensions and activation of a transformers experts module."""
        e, two_i, h = original.gate_up_proj.shape
        return cls(int(e), int(h), int(two_i) // 2, original.act_fn, fmt)

    def load(self, gate_up: PackedWeight, down: PackedWeight) -> None:
        """Install the packed weights (``gate_up`` rows: gate first, then up)."""
        e, i, h = self.num_experts, self.intermediate_dim, self.hidden_dim
        if tuple(gate_up.scale.shape[:2]) != (e, 2 * i) or gate_up.columns != h:
            raise ValueError(f"gate_up codes do not fit experts [{e}, {2 * i}, {h}]")
        if tuple(down.scale.shape[:2]) != (e, h) or down.columns != i:
            raise ValueError(f"down codes do not fit experts [{e}, {h}, {i}]")
        self._store("gate_up", gate_up)
        self._store("down", down)

    def expert_weights(self, expert: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The dequantized ``gate_up [2I, H]`` and ``down [H, I]`` of one expert."""
        return self._weight("gate_up", expert).to(dtype), self._weight("down", expert).to(dtype)

    def dequantize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All experts' weights in float32: ``gate_up [E, 2I, H]`` and ``down [E, H, I]``."""
        return self._weight("gate_up"), self._weight("down")

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        # The arithmetic of transformers' eager experts loop, with weights dequantized per expert.
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert in hit:
            expert = int(expert[0])
            if expert == self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(mask[expert])
            gate_up, down = self.expert_weights(expert, hidden_states.dtype)
            gate, up = nn.functional.linear(hidden_states[token_idx], gate_up).chunk(2, dim=-1)
            out = nn.functional.linear(self.act_fn(gate) * up, down)
            out = out * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final

    def extra_repr(self) -> str:
        dims = f"experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}"
        return f"{dims}, {self.fmt.label}"


class QuantizedLinear(_PackedHolder):
    """An ``nn.Linear`` whose weight is packed codes (the bias, if any, stays a normal parameter)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, fmt: QuantFormat) -> None:
        super().__init__(fmt)
        self.in_features = in_features
        self.out_features = out_features
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        for part in ("codes", "scale", "zero"):
            self.register_buffer(f"weight_{part}", None, persistent=False)

    @classmethod
    def like(cls, original: nn.Linear, fmt: QuantFormat) -> QuantizedLinear:
        return cls(original.in_features, original.out_features, original.bias is not None, fmt)

    def load(self, weight: PackedWeight) -> None:
        if tuple(weight.scale.shape[:1]) != (self.out_features,) or weight.columns != self.in_features:
            raise ValueError(f"codes do not fit a [{self.out_features}, {self.in_features}] weight")
        self._store("weight", weight)

    def dequantize(self) -> torch.Tensor:
        return self._weight("weight")

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight: model code reads its linears' ``.weight`` (Switch Transformers' and
        NLLB-MoE's experts check its dtype in their forward, Switch's weight init draws into it); before
        the codes are installed, an empty placeholder on the meta device."""
        if getattr(self, "weight_codes", None) is None:
            return torch.empty((self.out_features, self.in_features), device="meta")
        return self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self.dequantize().to(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, {self.fmt.label}"
