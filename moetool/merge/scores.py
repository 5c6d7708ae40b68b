"""Importance of each expert of a layer, one pure function per pruning criterion.

* ``frequency``: how many tokens chose the expert (top-k selections);
* ``soft-frequency``: the expert's mean router probability over all tokens;
* ``reap``: Router-weighted Expert Activation Pruning (Lasby et al., 2025), the mean over the tokens
  routed to an expert of the norm of what it adds to the layer output, ``g(x) * ||E(x)||`` (or
  ``||E(g(x) x)||`` where the router weight scales the input, as in Llama-4). Unlike frequency it keeps
  a rarely chosen expert whose contribution is large, and drops a popular one that adds little;
* ``ean``: Expert Activation Norm, the sum over the tokens routed to an expert of the norm of its output
  ``||E(x)||`` (router weight left out): how much an expert computes on the tokens it gets, which favours
  both frequent and strong experts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from moetool.merge.layout import Experts


def frequency(counts: Sequence[float]) -> list[float]:
    """Importance = number of top-k selections."""
    return [float(c) for c in counts]


def soft_frequency(prob_mean: Sequence[float]) -> list[float]:
    """Importance = mean router probability."""
    return [float(p) for p in prob_mean]


def reap(norm_sums: Sequence[float], routed: Sequence[float]) -> list[float]:
    """REAP importance from per-expert sums of contribution norms and routed-token counts.

    Args:
        norm_sums: for each expert, the sum over the tokens routed to it of ``||g(x) E(x)||``.
        routed: for each expert, how many tokens were routed to it (in the same sample).

    Returns:
        The mean contribution norm per routed token; 0 for an expert no token reached.
    """
    return [float(s) / float(n) if n else 0.0 for s, n in zip(norm_sums, routed, strict=True)]


def ean(norm_sums: Sequence[float]) -> list[float]:
    """EAN importance: per expert, the sum over the tokens routed to it of ``||E(x)||``.

    Args:
        norm_sums: from :func:`contribution_norms` with ``weighted=False``.
    """
    return [float(s) for s in norm_sums]


def contribution_norms(
    experts: Experts,
    x: torch.Tensor,
    indices: torch.Tensor,
    weights: torch.Tensor,
    act: Callable,
    *,
    scales_input: bool = False,
    weighted: bool = True,
) -> tuple[list[float], list[int]]:
    """Sums of ``||g(x) E(x)||`` per expert over the tokens routed to it, and their counts.

    Args:
        experts: the layer's experts (canonical, float32).
        x: tokens ``[n, H]`` (MoE-block inputs).
        indices: ``[n, k]`` chosen experts.
        weights: ``[n, k]`` their routing weights, as the model applies them.
        act: the activation.
        scales_input: the weight multiplies the expert's input (Llama-4) instead of its output.
        weighted: ``False`` leaves the routing weight out: sums of ``||E(x)||`` (EAN).

    Returns:
        ``(norm_sums, routed_counts)``, one entry per expert.
    """
    import torch

    from moetool.merge.ffn import expert_forward

    sums, counts = [], []
    for e in range(experts.num_experts):
        rows, slots = torch.nonzero(indices == e, as_tuple=True)
        counts.append(int(rows.numel()))
        if not rows.numel():
            sums.append(0.0)
            continue
        tokens = x[rows].float()
        if not weighted:
            out = expert_forward(experts, e, tokens, act)
        else:
            w = weights[rows, slots].float()[:, None]
            out = (
                expert_forward(experts, e, tokens * w, act)
                if scales_input
                else w * expert_forward(experts, e, tokens, act)
            )
        sums.append(float(out.norm(dim=-1).double().sum()))
    return sums, counts
