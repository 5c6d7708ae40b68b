"""Combine experts: frequency-weighted averages after neuron alignment, and the dense strategies.

Pure functions over canonical tensors (:class:`moetool.merge.layout.Experts`). An FFN is a
:class:`moetool.merge.ffn.FFN` (gate ``[I, H]`` or none, up ``[I, H]``, down ``[H, I]``, optional biases).

Dense strategies (``--to-dense``), for replacing ``sum_k w_k E_k(x)`` by one FFN:

* ``top1``: the most used expert, its output scaled by the mean total routing weight (1 where the
  family renormalises the top-k weights);
* ``average``: the frequency-weighted average of all experts after aligning their neurons to the most
  used one;
* ``concat``: the experts side by side, each expert's down projection scaled by its mean routing
  weight over all tokens, so the FFN computes ``sum_e E[w_e] E_e(x)``. With a width below ``N * I``
  whole experts are kept in order of importance and their coefficients renormalised.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from moetool.merge.ffn import FFN

if TYPE_CHECKING:
    import torch

    from moetool.merge.layout import Experts


def _expert(experts: Experts, e: int) -> FFN:
    return experts.ffn(e)


def _add(total: torch.Tensor | None, w: float, t: torch.Tensor | None) -> torch.Tensor | None:
    return None if total is None or t is None else total + w * t


def merge_group(
    experts: Experts,
    members: Sequence[int],
    weights: Sequence[float],
    *,
    align: bool = True,
    tokens: torch.Tensor | None = None,
    act: Callable | None = None,
) -> FFN:
    """Average a group of experts, each weighted, after aligning every member to the first.

    Args:
        experts: the layer's experts (float32).
        members: expert indices; the first is the reference the others are aligned to.
        weights: one weight per member (they should sum to 1).
        align: match neurons by permutation before averaging.
        tokens / act: calibration tokens ``[n, H]`` and the activation: when given, neurons are matched
            by the correlation of their activations on these tokens instead of by their weights.

    Returns:
        The averaged FFN. A one-member group is returned unchanged (scaled by its weight).
    """
    from moetool.merge.align import match_by_activations, match_neurons, permute
    from moetool.merge.ffn import hidden

    reference = _expert(experts, members[0])
    ref_h = hidden(reference, tokens, act) if align and tokens is not None and act else None
    total = reference.map(lambda t: t * weights[0])
    for e, w in zip(members[1:], weights[1:], strict=True):
        member = _expert(experts, e)
        if align and ref_h is not None:
            member = permute(member, match_by_activations(ref_h, hidden(member, tokens, act)))
        elif align:
            member = permute(member, match_neurons(reference, member))
        total = FFN(*(_add(a, w, b) for a, b in zip(total, member, strict=True)))
    return total


def merge_experts(
    experts: Experts,
    groups: Sequence[Sequence[int]],
    weights: Sequence[Sequence[float]],
    *,
    align: bool = True,
    tokens: torch.Tensor | None = None,
    act: Callable | None = None,
) -> Experts:
    """One merged expert per group (see :func:`merge_group`); singleton groups are copied exactly."""
    from moetool.merge.layout import Experts

    parts = []
    for members, w in zip(groups, weights, strict=True):
        if len(members) == 1:
            parts.append(_expert(experts, members[0]))
        else:
            parts.append(merge_group(experts, members, w, align=align, tokens=tokens, act=act))
    return Experts.stack(parts)


def scale(ffn: FFN, factor: float) -> FFN:
    """Multiply an FFN's output by ``factor`` (its down projection and bias)."""
    down_bias = None if ffn.down_bias is None else ffn.down_bias * factor
    return ffn._replace(down=ffn.down * factor, down_bias=down_bias)


def _cat(parts: Sequence[torch.Tensor | None], dim: int) -> torch.Tensor | None:
    import torch

    present = [p for p in parts if p is not None]
    if not present:
        return None
    if len(present) != len(parts):
        raise ValueError("cannot concatenate FFNs with and without this projection")
    return torch.cat(list(present), dim=dim)


def concat(parts: Sequence[FFN]) -> FFN:
    """FFNs side by side: one FFN computing the sum of their outputs (their output biases add up)."""
    down_biases = [p.down_bias for p in parts if p.down_bias is not None]
    up = _cat([p.up for p in parts], 0)
    down = _cat([p.down for p in parts], 1)
    assert up is not None and down is not None
    return FFN(
        _cat([p.gate for p in parts], 0),
        up,
        down,
        _cat([p.gate_bias for p in parts], 0),
        _cat([p.up_bias for p in parts], 0),
        sum(down_biases[1:], down_biases[0]) if down_biases else None,
    )


def pad(ffn: FFN, width: int) -> FFN:
    """Widen an FFN with zero neurons (exact: a neuron whose down column is zero adds nothing)."""
    import torch

    extra = width - ffn.width
    if extra < 0:
        raise ValueError(f"cannot pad an FFN of width {ffn.width} to {width}")
    if extra == 0:
        return ffn
    zeros_in = torch.zeros(extra, ffn.up.shape[1], dtype=ffn.up.dtype)
    zeros_out = torch.zeros(ffn.down.shape[0], extra, dtype=ffn.down.dtype)

    def rows(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else torch.cat([t, zeros_in if t.dim() == 2 else torch.zeros(extra, dtype=t.dtype)])

    return FFN(
        rows(ffn.gate),
        rows(ffn.up),
        torch.cat([ffn.down, zeros_out], dim=1),
        rows(ffn.gate_bias),
        rows(ffn.up_bias),
        ffn.down_bias,
    )


def dense_top1(experts: Experts, scores: Sequence[float], weight_sum: float) -> tuple[FFN, list[int]]:
    """The most important expert alone, scaled by the mean total routing weight; also returns ``[its index]``."""
    best = max(range(len(scores)), key=lambda e: (scores[e], -e))
    return scale(_expert(experts, best), weight_sum), [best]


def dense_average(
    experts: Experts,
    scores: Sequence[float],
    weight_sum: float,
    *,
    align: bool = True,
    tokens: torch.Tensor | None = None,
    act: Callable | None = None,
) -> tuple[FFN, list[int]]:
    """The score-weighted average of every expert, aligned to the most important one."""
    from moetool.merge.grouping import weights_within

    order = sorted(range(len(scores)), key=lambda e: (-scores[e], e))
    ffn = merge_group(experts, order, weights_within([order], scores)[0], align=align, tokens=tokens, act=act)
    return scale(ffn, weight_sum), order


def dense_concat(
    experts: Experts, coefficients: Sequence[float], width: int, weight_sum: float
) -> tuple[FFN, list[int]]:
    """Experts side by side, each scaled by its mean routing weight, keeping ``width`` neurons.

    Args:
        experts: the layer's experts.
        coefficients: each expert's mean routing weight over all tokens (``E[w_e]``; they sum to
            ``weight_sum``). Experts are kept in decreasing order of this coefficient.
        width: the FFN width; whole experts are kept while they fit, then the neurons of the next one
            with the largest weight norms (so ``width`` need not be a multiple of ``I``).
        weight_sum: the mean total routing weight; the kept coefficients are rescaled to sum to it.

    Returns:
        The FFN and the experts it draws on, in order.
    """
    import torch

    order = sorted(range(len(coefficients)), key=lambda e: (-coefficients[e], e))
    size = experts.width
    parts: list[FFN] = []
    used: list[int] = []
    left = width
    for e in order:
        if left <= 0:
            break
        take = min(size, left)
        ffn = _expert(experts, e)
        if take < size:  # a partial expert: its neurons with the largest weight norms
            norms = ffn.up.norm(dim=1) if ffn.gate is None else ffn.gate.norm(dim=1) * ffn.up.norm(dim=1)
            norms = norms * ffn.down.norm(dim=0)
            keep = torch.topk(norms, take).indices.sort().values
            ffn = _keep_neurons(ffn, keep)
        parts.append(ffn)
        used.append(e)
        left -= take
    kept = sum(max(float(coefficients[e]), 0.0) for e in used)
    factors = [
        (max(float(coefficients[e]), 0.0) / kept) * weight_sum if kept > 0 else weight_sum / len(used) for e in used
    ]
    ffn = concat([scale(p, f) for p, f in zip(parts, factors, strict=True)])
    return ffn, used


def _keep_neurons(ffn: FFN, keep: torch.Tensor) -> FFN:
    def rows(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[keep]

    return FFN(rows(ffn.gate), ffn.up[keep], ffn.down[:, keep], rows(ffn.gate_bias), rows(ffn.up_bias), ffn.down_bias)


def fit_down(
    ffn: FFN, x: torch.Tensor, target: torch.Tensor, act: Callable, *, ridge: float = 1e-3
) -> tuple[FFN, dict[str, float]]:
    """Refit an FFN's down projection by least squares so that it reproduces ``target`` on tokens ``x``.

    With gate and up fixed, the FFN output is linear in the down projection, so the best one in the
    least-squares sense is a ridge regression: ``D^T = (h^T h + l I)^-1 h^T y`` with ``h`` the
    intermediate activations on ``x``. Used by ``--to-dense``: ``target`` is what the MoE layer's routed
    experts added on the calibration tokens.

    Args:
        ffn: (gate, up, down); gate and up are kept.
        x: tokens ``[n, H]``.
        target: the outputs to reproduce ``[n, H]``.
        act: the activation.
        ridge: regularisation, relative to the mean diagonal of ``h^T h``.

    Returns:
        The refitted FFN and ``{"error_before", "error_after"}``: relative squared errors on ``x``.
    """
    import torch

    from moetool.merge.ffn import hidden

    down = ffn.down
    h = hidden(ffn, x.float(), act).double()
    # An output bias stays as it is: the refit reproduces what the neurons add to it.
    y = target.double() if ffn.down_bias is None else (target - ffn.down_bias).double()
    gram = h.T @ h
    scale = float(gram.diagonal().mean()) or 1.0
    gram += ridge * scale * torch.eye(gram.shape[0], dtype=gram.dtype)
    new_down = torch.linalg.solve(gram, h.T @ y).T
    norm = float((y**2).sum()) or 1.0
    before = float(((h @ down.double().T - y) ** 2).sum()) / norm
    after = float(((h @ new_down.T - y) ** 2).sum()) / norm
    if not after <= before:
        return ffn, {"error_before": before, "error_after": before}
    return ffn._replace(down=new_down.to(down.dtype)), {"error_before": before, "error_after": after}


def routed_output(
    experts: Experts,
    x: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    act: Callable,
    *,
    scales_input: bool,
) -> torch.Tensor:
    """What the routed experts of a layer add to its output on tokens ``x`` (given the routing)."""
    import torch

    from moetool.merge.ffn import expert_forward

    out = torch.zeros(x.shape[0], experts.hidden_size, dtype=torch.float32)
    for e in range(experts.num_experts):
        rows, slots = torch.nonzero(indices == e, as_tuple=True)
        if not rows.numel():
            continue
        w = weights[rows, slots].float()[:, None]
        tokens = x[rows].float()
        contribution = (
            expert_forward(experts, e, tokens * w, act) if scales_input else w * expert_forward(experts, e, tokens, act)
        )
        out.index_add_(0, rows, contribution)
    return out
