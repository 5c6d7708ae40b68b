"""``--fail-if`` thresholds: expressions like ``cv>0.5`` checked against every MoE layer."""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from moetool.errors import UsageError
from moetool.routing.stats import METRICS, RoutingStats

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
    ">": operator.gt,
    "<": operator.lt,
}
_ALIASES = {"maxvio": "max_mean", "max/mean": "max_mean", "dead_experts": "dead", "margin": "top1_top2_margin"}
_EXPR = re.compile(
    r"^\s*([A-Za-z_][A-Za-z0-9_/.@]*)\s*(>=|<=|==|!=|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$"
)


@dataclass(frozen=True)
class Threshold:
    """A failure condition: the run fails when ``metric op value`` holds for some layer."""

    metric: str
    op: str
    value: float
    text: str

    def broken_by(self, observed: float) -> bool:
        return not math.isnan(observed) and _OPS[self.op](observed, self.value)


def parse_threshold(text: str) -> Threshold:
    """Parse one ``--fail-if`` expression.

    Raises:
        UsageError: the expression is malformed or names an unknown metric.
    """
    match = _EXPR.match(text)
    if not match:
        raise UsageError(
            f"cannot parse --fail-if {text!r}", hint="write METRIC OP NUMBER, for example 'cv>0.5' or 'dead>=1'"
        )
    name, op, value = match.groups()
    name = _ALIASES.get(name.lower(), name.lower())
    if name.startswith("drop") and "@" not in name:
        name = "drop@" + name.removeprefix("drop").lstrip("_") if name != "drop" else "drop@1.0"
    if name not in METRICS:
        raise UsageError(f"--fail-if names unknown metric {name!r}", hint=f"metrics: {', '.join(METRICS)}")
    return Threshold(name, op, float(value), text.strip())


@dataclass(frozen=True)
class Violation:
    """A layer that broke a threshold."""

    layer: int
    threshold: Threshold
    observed: float

    def __str__(self) -> str:
        return (
            f"layer {self.layer}: {self.threshold.metric}={self.observed:.4g} broke --fail-if '{self.threshold.text}'"
        )


def check_thresholds(stats: RoutingStats, thresholds: Sequence[Threshold]) -> list[Violation]:
    """Every (layer, threshold) pair whose condition holds."""
    return [
        Violation(layer.layer, threshold, observed)
        for threshold in thresholds
        for layer in stats.layers
        if threshold.broken_by(observed := layer.metric(threshold.metric))
    ]
