"""Align the intermediate neurons of two experts by a permutation, before averaging them.

An MLP expert is unchanged when its intermediate neurons are permuted: row ``i`` of gate and up and
column ``i`` of down move together. Two experts trained apart compute similar features in different
neuron orders, so averaging them position by position mixes unrelated neurons; matching neurons first
(weight matching, as in Git Re-Basin and MC-SMoE) makes the average meaningful. The match maximises the
summed similarity of the neurons' concatenated ``[gate row, up row, down column]`` vectors, a linear
assignment problem solved exactly with ``scipy.optimize.linear_sum_assignment``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from moetool.merge.ffn import FFN


def neuron_features(ffn: FFN) -> torch.Tensor:
    """One row per neuron: ``[gate[i], up[i], down[:, i]]`` -> ``[I, 3H]`` (no gate row for a two-matrix
    expert; a neuron's gate and up biases are one more column each)."""
    import torch

    columns = [t[:, None] for t in (ffn.gate_bias, ffn.up_bias) if t is not None]
    rows = [ffn.gate] if ffn.gate is not None else []
    return torch.cat([*rows, ffn.up, ffn.down.T, *columns], dim=1)


def match_neurons(reference: FFN, other: FFN) -> torch.Tensor:
    """The permutation of ``other``'s neurons that best matches ``reference``'s.

    Args:
        reference: the expert aligned to.
        other: the expert to align.

    Returns:
        ``perm`` (long ``[I]``) such that neuron ``i`` of the aligned expert is neuron ``perm[i]`` of
        ``other``: ``gate[perm]``, ``up[perm]``, ``down[:, perm]`` (see :func:`permute`).
    """
    import numpy as np
    import torch
    from scipy.optimize import linear_sum_assignment

    ref = neuron_features(reference).double()
    oth = neuron_features(other).double()
    similarity = (ref @ oth.T).cpu().numpy()
    rows, cols = linear_sum_assignment(similarity, maximize=True)
    perm = np.empty(len(rows), dtype=np.int64)
    perm[rows] = cols
    return torch.from_numpy(perm)


def permute(expert: FFN, perm: torch.Tensor) -> FFN:
    """Reorder an expert's neurons: gate/up rows (and biases) and down columns move together (the function
    is unchanged)."""
    from moetool.merge.ffn import FFN

    def rows(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[perm]

    return FFN(
        rows(expert.gate),
        expert.up[perm],
        expert.down[:, perm],
        rows(expert.gate_bias),
        rows(expert.up_bias),
        expert.down_bias,
    )


def match_by_activations(reference: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """The permutation of ``other``'s neurons whose activations correlate best with ``reference``'s.

    Activation matching (ZipIt, MC-SMoE's alternative to weight matching): the intermediate activations
    of both experts on the same calibration tokens, ``[n, I]`` each; neurons are paired to maximise the
    summed Pearson correlation.

    Returns:
        ``perm`` as in :func:`match_neurons`.
    """
    import numpy as np
    import torch
    from scipy.optimize import linear_sum_assignment

    def standardise(h: torch.Tensor) -> torch.Tensor:
        h = h.double() - h.double().mean(dim=0, keepdim=True)
        return h / (h.norm(dim=0, keepdim=True) + 1e-12)

    correlation = (standardise(reference).T @ standardise(other)).cpu().numpy()
    rows, cols = linear_sum_assignment(correlation, maximize=True)
    perm = np.empty(len(rows), dtype=np.int64)
    perm[rows] = cols
    return torch.from_numpy(perm)
