"""GPTQ (Frantar et al. 2022), batched over a leading expert dimension.

For one linear map ``y = W x`` with ``W [rows, columns]`` and the Hessian ``H = sum x x^T`` of the
inputs that reach it, GPTQ quantizes the columns in order and spreads each column's rounding error
over the columns not yet quantized, weighted by the inverse Hessian (through its upper Cholesky
factor), so that the layer's *output* error on those inputs stays small. Here ``W`` is
``[E, rows, columns]`` and ``H`` is ``[E, columns, columns]``: every step is one tensor operation over
all ``E`` experts of a layer, so on a GPU the experts are quantized together (one kernel per step
instead of ``E``) and on the CPU the very same code runs. ``E = 1`` quantizes a single matrix.

Options: group-wise parameters (a new scale/zero every ``group_size`` columns, from the weights as
GPTQ has updated them; with ``act_order`` the groups are fixed up front from the original weights so
that storage needs no column permutation), ``act_order`` (columns with the largest Hessian diagonal
first), dampening (``damp`` times the mean diagonal added to the diagonal; raised per expert when a
Cholesky factorisation fails). Columns no calibration token ever touched (zero diagonal) get a unit
diagonal, so they are rounded to nearest. An identity Hessian makes GPTQ round-to-nearest exactly,
which is how experts without enough calibration tokens fall back to it.

Reproducible bytes: on the CPU the codes depend on the thread count unless every step runs on the
same number of threads. MKL's Cholesky and triangular inverse, and its GEMMs for skinny matrices (the
few tokens routed to a rare expert, in the layer's own forward and in the down-projection Hessian),
split their sums differently with 2 threads than with 1; the last-bit differences move some weights
across a rounding boundary and, layer after layer, through the calibration inputs of the next layers
(measured on the example, GPTQ 4-bit: 78 of its 318 tensors differed between 1 and 2 threads, the
first difference in the first layer's Cholesky factor). :func:`reproducible_threads` runs a layer's
GPTQ (calibration passes, Hessians, factorisations, the column loop) on one thread, so the output is
the same whatever ``--threads`` says (and whatever ``OMP_NUM_THREADS`` or the idle cores give);
``MOETOOL_GPTQ_THREADS=0`` gives that up for speed on an idle many-core machine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from moetool.quantize.grids import Grid, group_bounds, torch_dtype
from moetool.quantize.rtn import QuantizedWeight

if TYPE_CHECKING:
    import torch

DEFAULT_DAMP = 0.01
DEFAULT_BLOCK = 128

#: Threads the CPU runs GPTQ on: fixed, so that the codes do not depend on the machine's load.
GPTQ_CPU_THREADS = 1

#: Overrides :data:`GPTQ_CPU_THREADS`; 0 lets GPTQ use the command's thread count (faster on an idle
#: many-core machine, but the bytes then depend on that count).
ENV_GPTQ_THREADS = "MOETOOL_GPTQ_THREADS"


def gptq_cpu_threads() -> int:
    """The thread count GPTQ runs on, on the CPU (0: the command's)."""
    import os

    value = os.environ.get(ENV_GPTQ_THREADS, "").strip()
    try:
        return max(0, int(value)) if value else GPTQ_CPU_THREADS
    except ValueError:
        return GPTQ_CPU_THREADS


@contextlib.contextmanager
def reproducible_threads(device: Any) -> Iterator[None]:
    """Run GPTQ's CPU work on :func:`gptq_cpu_threads` threads (see the module docstring); on a GPU,
    change nothing."""
    import torch

    from moetool.threads import thread_count

    if torch.device(device).type != "cpu":
        yield
        return
    with thread_count(gptq_cpu_threads()):
        yield


@dataclass
class GPTQStats:
    """What one batched GPTQ call did.

    Attributes:
        damp: the dampening finally used per expert (raised where Cholesky failed).
        dead_columns: per expert, input columns no calibration token touched.
        proxy_error: per expert, ``tr((W - Q) H (W - Q)^T)`` (the output error on the calibration
            inputs that GPTQ minimises), with the Hessian as given (before dampening).
    """

    damp: list[float] = field(default_factory=list)
    dead_columns: list[int] = field(default_factory=list)
    proxy_error: list[float] = field(default_factory=list)


def _inverse_cholesky(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Upper Cholesky factor of ``H^-1`` per expert, dampening more where ``H`` is not positive definite."""
    import torch

    e, c, _ = hessian.shape
    eye = torch.eye(c, dtype=hessian.dtype, device=hessian.device)
    mean_diag = hessian.diagonal(dim1=-2, dim2=-1).mean(-1).clamp(min=1e-12)
    factors = torch.full((e,), damp, dtype=hessian.dtype, device=hessian.device)
    for _attempt in range(8):
        damped = hessian + (factors * mean_diag)[:, None, None] * eye
        chol, info = torch.linalg.cholesky_ex(damped)
        failed = info != 0
        if not bool(failed.any()):
            break
        factors = torch.where(failed, factors * 10, factors)
    else:  # pragma: no cover - only for Hessians that are not Hessians (NaN, negative)
        raise FloatingPointError("GPTQ: the Hessian is not positive definite even with heavy dampening")
    inverse = torch.cholesky_inverse(chol)
    upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
    if bool((info != 0).any()):  # pragma: no cover - numerically singular after inversion
        raise FloatingPointError("GPTQ: the inverse Hessian lost positive definiteness")
    return upper, factors


def _aligned_block(group_size: int, columns: int, block: int) -> int:
    """A block length that is a multiple of the group size, so a group never spans two blocks."""
    if group_size <= 0 or group_size >= columns:
        return block
    return group_size * max(1, block // group_size)


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    grid: Grid,
    group_size: int,
    *,
    act_order: bool = False,
    damp: float = DEFAULT_DAMP,
    block_size: int = DEFAULT_BLOCK,
    stats: GPTQStats | None = None,
) -> QuantizedWeight:
    """Quantize ``weight [E, rows, columns]`` with GPTQ, given ``hessian [E, columns, columns]``.

    Args:
        weight: float weights of ``E`` matrices (experts); computed in float32 on their device.
        hessian: ``sum x x^T`` over the calibration inputs of each matrix (any positive scale).
        grid: the quantization grid.
        group_size: input columns per group (0: one group per row; a last shorter group is allowed).
        act_order: quantize columns in order of decreasing Hessian diagonal.
        damp: dampening, as a fraction of the mean Hessian diagonal.
        block_size: columns per lazy-update block (rounded to a multiple of the group size).
        stats: filled with the dampening used, dead columns and the proxy error, when given.

    Returns:
        Codes, group parameters and dequantized weights in the original column order.
    """
    import torch

    if weight.dim() != 3 or hessian.dim() != 3:
        raise ValueError("gptq_quantize expects weight [E, rows, columns] and hessian [E, columns, columns]")
    e, rows, columns = weight.shape
    if hessian.shape != (e, columns, columns):
        raise ValueError(f"hessian shape {tuple(hessian.shape)} does not match weight {tuple(weight.shape)}")
    device = weight.device
    w = weight.detach().to(torch.float32).clone()
    h = hessian.detach().to(device=device, dtype=torch.float32).clone()

    diag = h.diagonal(dim1=-2, dim2=-1)
    dead = diag <= 0
    # A column no calibration token touched: nothing to balance against, round it to nearest.
    diag.masked_fill_(dead, 1.0)
    original_h = h.clone() if stats is not None else None

    bounds = group_bounds(columns, group_size)
    size = bounds[0][1] - bounds[0][0]
    group_of = torch.arange(columns, device=device) // size

    perm = inverse_perm = None
    static_scale = static_zero = None
    if act_order:
        perm = torch.argsort(diag, dim=-1, descending=True)  # [E, C]
        inverse_perm = torch.argsort(perm, dim=-1)
        # Groups fixed up front on the original columns: storage then needs no permutation.
        scales, zeros = [], []
        for start, end in bounds:
            scale, zero = grid.fit(w[..., start:end])
            scales.append(scale)
            zeros.append(zero)
        static_scale = torch.stack(scales, dim=-1)  # [E, R, G]
        static_zero = None if zeros[0] is None else torch.stack(zeros, dim=-1)
        w = torch.gather(w, 2, perm[:, None, :].expand(e, rows, columns))
        h = torch.gather(h, 1, perm[:, :, None].expand(e, columns, columns))
        h = torch.gather(h, 2, perm[:, None, :].expand(e, columns, columns))

    upper, factors = _inverse_cholesky(h, damp)

    codes = torch.zeros((e, rows, columns), dtype=torch.uint8, device=device)
    deq = torch.zeros((e, rows, columns), dtype=torch.float32, device=device)
    dyn_scales: list[torch.Tensor] = []
    dyn_zeros: list[torch.Tensor | None] = []
    scale = zero = None
    block = _aligned_block(group_size, columns, block_size)
    for i1 in range(0, columns, block):
        i2 = min(i1 + block, columns)
        count = i2 - i1
        w1 = w[:, :, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = upper[:, i1:i2, i1:i2]
        for i in range(count):
            col = i1 + i
            if act_order:
                assert perm is not None and static_scale is not None
                g = group_of[perm[:, col]]  # [E]: each expert's column comes from its own group
                index = g[:, None, None].expand(e, rows, 1)
                scale = torch.gather(static_scale, 2, index).squeeze(2)
                zero = None if static_zero is None else torch.gather(static_zero, 2, index).squeeze(2)
            elif col % size == 0:
                end = min(col + size, columns)
                # The group's columns as GPTQ has updated them so far: from the working block, and
                # beyond it (one group per row) from the matrix, which is up to date at a block start.
                part = w1[:, :, i : i + (end - col)] if end <= i2 else torch.cat([w1[:, :, i:], w[:, :, i2:end]], -1)
                scale, zero = grid.fit(part)
                dyn_scales.append(scale)
                dyn_zeros.append(zero)
            column = w1[:, :, i]
            c, q = grid.quantize(column, scale, zero)
            codes[:, :, col] = c
            deq[:, :, col] = q
            d = u1[:, i, i]  # [E]
            err = (column - q) / d[:, None]
            w1[:, :, i:] -= err.unsqueeze(2) * u1[:, i, i:].unsqueeze(1)
            err1[:, :, i] = err
        if i2 < columns:
            w[:, :, i2:] -= torch.bmm(err1, upper[:, i1:i2, i2:])

    if act_order:
        assert inverse_perm is not None and static_scale is not None
        index = inverse_perm[:, None, :].expand(e, rows, columns)
        codes = torch.gather(codes, 2, index)
        deq = torch.gather(deq, 2, index)
        scale_t, zero_t = static_scale, static_zero
    else:
        scale_t = torch.stack(dyn_scales, dim=-1)
        zero_t = None if dyn_zeros[0] is None else torch.stack(dyn_zeros, dim=-1)

    if stats is not None:
        assert original_h is not None  # taken before the permutation: original column order
        delta = weight.detach().to(torch.float32) - deq
        proxy = torch.einsum("erc,ecd,erd->e", delta, original_h, delta)
        stats.damp = [float(x) for x in factors]
        stats.dead_columns = [int(x) for x in dead.sum(-1)]
        stats.proxy_error = [float(x) for x in proxy]
    return QuantizedWeight(
        codes=codes,
        scale=scale_t.to(torch_dtype(grid.scale_dtype)),
        zero=None if zero_t is None else zero_t.to(torch.uint8),
        dequantized=deq,
        group_size=group_size,
    )
