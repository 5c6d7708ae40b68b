"""Balance metrics of an expert-load distribution (pure functions over plain sequences).

All take per-expert counts (or probabilities) and return floats; none depends on torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def fractions(counts: Sequence[float]) -> list[float]:
    """Counts normalised to sum to 1 (all zeros stay zeros)."""
    total = float(sum(counts))
    return [c / total if total else 0.0 for c in counts]


def coefficient_of_variation(counts: Sequence[float]) -> float:
    """Population standard deviation over mean: 0 for perfect balance."""
    n = len(counts)
    mean = sum(counts) / n if n else 0.0
    if mean == 0:
        return 0.0
    variance = sum((c - mean) ** 2 for c in counts) / n
    return math.sqrt(variance) / mean


def normalized_entropy(counts: Sequence[float]) -> float:
    """Shannon entropy of the load distribution divided by log(num_experts): 1 for perfect balance."""
    n = len(counts)
    if n <= 1:
        return 1.0
    probs = fractions(counts)
    entropy = -sum(p * math.log(p) for p in probs if p > 0)
    return entropy / math.log(n)


def max_over_mean(counts: Sequence[float]) -> float:
    """Load of the busiest expert over the mean load (MaxVio + 1): 1 for perfect balance."""
    n = len(counts)
    mean = sum(counts) / n if n else 0.0
    return max(counts) / mean if mean else 0.0


def gini(counts: Sequence[float]) -> float:
    """Gini coefficient of the load: 0 for perfect balance, (n-1)/n when one expert takes all."""
    n = len(counts)
    total = float(sum(counts))
    if n == 0 or total == 0:
        return 0.0
    ordered = sorted(counts)
    weighted = sum((i + 1) * c for i, c in enumerate(ordered))
    return (2 * weighted) / (n * total) - (n + 1) / n


def js_divergence(p: Sequence[float], q: Sequence[float]) -> float:
    """Jensen-Shannon divergence (base 2, in [0, 1]) between two distributions (normalised here)."""
    p, q = fractions(p), fractions(q)
    m = [(a + b) / 2 for a, b in zip(p, q, strict=True)]

    def kl(a: Sequence[float], b: Sequence[float]) -> float:
        return sum(x * math.log2(x / y) for x, y in zip(a, b, strict=True) if x > 0)

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)
