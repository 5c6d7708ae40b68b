"""Round-to-nearest: the data-free baseline every data-dependent method must beat.

Each group of ``group_size`` consecutive input columns of a row gets its own parameters from the grid
and every weight goes to the nearest code. Works on ``[..., rows, columns]`` with any leading
dimensions (all experts of a layer at once).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from moetool.quantize.grids import Grid, group_bounds, torch_dtype

if TYPE_CHECKING:
    import torch


@dataclass
class QuantizedWeight:
    """One quantized weight tensor (or a stack of them, one per expert).

    Attributes:
        codes: uint8 ``[..., rows, columns]``, one code per weight (unpacked).
        scale: ``[..., rows, groups]``, in the grid's scale dtype (float16 unless it says otherwise).
        zero: uint8 ``[..., rows, groups]`` for grids with a zero point, else ``None``.
        dequantized: float32 ``[..., rows, columns]``: exactly what the loader reconstructs (``None``
            once it has been put into the model and only the codes are kept, for the writer).
        group_size: the group size used (0: one group per row).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    dequantized: torch.Tensor | None
    group_size: int

    def select(self, index: int | slice, rows: slice | None = None) -> QuantizedWeight:
        """The part for one expert (or a range of experts), optionally only some rows."""
        rows = rows if rows is not None else slice(None)

        def take(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[index][..., rows, :]

        return QuantizedWeight(
            codes=take(self.codes),
            scale=take(self.scale),
            zero=take(self.zero),
            dequantized=take(self.dequantized),
            group_size=self.group_size,
        )


def rtn_quantize(weight: torch.Tensor, grid: Grid, group_size: int) -> QuantizedWeight:
    """Round-to-nearest quantization of ``weight [..., rows, columns]``.

    Args:
        weight: float weights; computed in float32 on the tensor's device.
        grid: the quantization grid.
        group_size: input columns per group (0: one group per row; a last shorter group is allowed).

    Returns:
        The codes, group parameters and dequantized weights.
    """
    import torch

    w = weight.detach().float()
    codes = torch.empty(w.shape, dtype=torch.uint8, device=w.device)
    deq = torch.empty_like(w)
    scales, zeros = [], []
    for start, end in group_bounds(w.shape[-1], group_size):
        block = w[..., start:end]
        scale, zero = grid.fit(block)
        c, q = grid.quantize(block, scale.unsqueeze(-1), None if zero is None else zero.unsqueeze(-1))
        codes[..., start:end] = c
        deq[..., start:end] = q
        scales.append(scale)
        zeros.append(zero)
    return QuantizedWeight(
        codes=codes,
        scale=torch.stack(scales, dim=-1).to(torch_dtype(grid.scale_dtype)),
        zero=None if zeros[0] is None else torch.stack(zeros, dim=-1).to(torch.uint8),
        dequantized=deq,
        group_size=group_size,
    )
