"""The routing profile as a result object and a versioned stats file that other commands reuse.

The stats file (``routing-stats.json``) is what ``merge`` and ``quantize`` read for expert
frequencies; its ``schema_version`` changes only with incompatible edits.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moetool.errors import MoetoolError
from moetool.routing import metrics
from moetool.routing.accumulate import CAPACITY_FACTORS, LayerAccumulator, switch_aux_loss

SCHEMA_VERSION = 1
STATS_KIND = "moetool.routing-stats"
STATS_FILE = "routing-stats.json"


@dataclass
class LayerStats:
    """Routing statistics of one MoE layer."""

    layer: int
    tokens: int
    top_k: int
    counts: list[int]
    prob_mean: list[float]
    coactivation: list[list[int]]
    dropped: dict[str, float]
    z_loss: float
    top1_prob: float
    top1_top2_margin: float
    domain_counts: dict[str, list[int]] = field(default_factory=dict)
    #: Capacity-limited models (Switch, NLLB-MoE): per expert, the assignments the model processed
    #: after its own capacity limit (``counts`` are the router's choices before it).
    model_kept: list[int] | None = None

    @property
    def model_dropped(self) -> float | None:
        """The fraction of assignments the model itself dropped at its expert capacity."""
        if self.model_kept is None:
            return None
        chosen = sum(self.counts)
        return (chosen - sum(self.model_kept)) / chosen if chosen else math.nan

    @property
    def num_experts(self) -> int:
        return len(self.counts)

    @property
    def fractions(self) -> list[float]:
        return metrics.fractions(self.counts)

    @property
    def cv(self) -> float:
        return metrics.coefficient_of_variation(self.counts)

    @property
    def entropy(self) -> float:
        return metrics.normalized_entropy(self.counts)

    @property
    def max_mean(self) -> float:
        return metrics.max_over_mean(self.counts)

    @property
    def gini(self) -> float:
        return metrics.gini(self.counts)

    @property
    def dead_experts(self) -> list[int]:
        return [i for i, c in enumerate(self.counts) if c == 0]

    @property
    def aux_loss(self) -> float:
        return switch_aux_loss(self.counts, [p * self.tokens for p in self.prob_mean], self.tokens)

    @property
    def domain_js(self) -> float:
        """Mean pairwise Jensen-Shannon divergence between the domains' expert distributions."""
        pairs = list(itertools.combinations(self.domain_counts.values(), 2))
        if not pairs:
            return 0.0
        return sum(metrics.js_divergence(a, b) for a, b in pairs) / len(pairs)

    def metric(self, name: str) -> float:
        """A scalar metric by its --fail-if name."""
        if name.startswith("drop"):
            return self.dropped[name.split("@", 1)[1]]
        if name == "dead":
            return float(len(self.dead_experts))
        return float(getattr(self, name))

    def to_json(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "tokens": self.tokens,
            "top_k": self.top_k,
            "counts": self.counts,
            "fractions": [round(f, 6) for f in self.fractions],
            "cv": self.cv,
            "entropy": self.entropy,
            "max_mean": self.max_mean,
            "gini": self.gini,
            "dead_experts": self.dead_experts,
            "aux_loss": self.aux_loss,
            "z_loss": self.z_loss,
            "dropped": self.dropped,
            "top1_prob": self.top1_prob,
            "top1_top2_margin": self.top1_top2_margin,
            "domain_js": self.domain_js,
            "prob_mean": self.prob_mean,
            "coactivation": self.coactivation,
            **(
                {"model_kept": self.model_kept, "model_dropped": self.model_dropped}
                if self.model_kept is not None
                else {}
            ),
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any], domains: dict[str, Any]) -> LayerStats:
        layer = doc["layer"]
        domain_counts = {}
        for name, entry in domains.items():
            for row in entry["layers"]:
                if row["layer"] == layer:
                    domain_counts[name] = row["counts"]
        return cls(
            layer=layer,
            tokens=doc["tokens"],
            top_k=doc["top_k"],
            counts=doc["counts"],
            prob_mean=doc["prob_mean"],
            coactivation=doc["coactivation"],
            dropped=doc["dropped"],
            z_loss=doc["z_loss"],
            top1_prob=doc["top1_prob"],
            top1_top2_margin=doc["top1_top2_margin"],
            domain_counts=domain_counts,
            model_kept=doc.get("model_kept"),
        )


METRICS = (
    "cv",
    "entropy",
    "max_mean",
    "gini",
    "dead",
    "aux_loss",
    "z_loss",
    "top1_prob",
    "top1_top2_margin",
    "domain_js",
    *(f"drop@{c}" for c in CAPACITY_FACTORS),
)


@dataclass
class RoutingStats:
    """A routing profile: per-layer statistics plus what produced them."""

    model: str
    model_type: str | None
    family: str
    routing: str
    num_experts: int
    top_k: int
    tokens: int
    layers: list[LayerStats]
    domain_tokens: dict[str, int] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)
    revision: str | None = None
    wall_seconds: float | None = None
    #: Capacity-limited models: the capacity the model applies (``{"expert_capacity": 64, "per":
    #: "sequence"}``), as read from its config.
    capacity: dict[str, Any] | None = None

    @property
    def aux_loss(self) -> float:
        """transformers' load_balancing_loss_func over all layers at once (their logits concatenated)."""
        if not self.layers or not self.tokens:
            return math.nan
        total_tokens = sum(layer.tokens for layer in self.layers)
        counts = [sum(layer.counts[e] for layer in self.layers) for e in range(self.num_experts)]
        prob_sum = [sum(layer.prob_mean[e] * layer.tokens for layer in self.layers) for e in range(self.num_experts)]
        return switch_aux_loss(counts, prob_sum, total_tokens)

    def count_matrix(self) -> list[list[int]]:
        """The ``[layers, experts]`` token-count matrix (the load input DeepSeek's EPLB takes)."""
        return [layer.counts for layer in self.layers]

    def to_json(self) -> dict[str, Any]:
        """The ``--json`` document and the stats file content (schema_version 1)."""
        domains = {
            name: {
                "tokens": tokens,
                "layers": [{"layer": layer.layer, "counts": layer.domain_counts[name]} for layer in self.layers],
            }
            for name, tokens in self.domain_tokens.items()
        }
        doc: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "kind": STATS_KIND,
            "model": self.model,
            "revision": self.revision,
            "model_type": self.model_type,
            "family": self.family,
            "routing": self.routing,
            "dataset": self.dataset,
            "tokens": self.tokens,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "moe_layers": [layer.layer for layer in self.layers],
            "aux_loss": self.aux_loss,
            "capacity_factors": list(CAPACITY_FACTORS),
            "wall_seconds": self.wall_seconds,
            "layers": [layer.to_json() for layer in self.layers],
        }
        if self.capacity is not None:
            doc["capacity"] = self.capacity
        if domains:
            doc["domains"] = domains
        return doc

    def save(self, path: Path) -> None:
        """Write the stats file (JSON, no NaN), with the versions of the code that produced it."""
        from moetool.versions import versions

        doc = {**self.to_json(), "versions": versions()}
        text = json.dumps(_finite(doc), indent=1, ensure_ascii=False, allow_nan=False)
        path.write_text(text + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> RoutingStats:
        """Read a stats file written by ``moetool profile-routing --out``.

        Raises:
            MoetoolError: the file is missing, not a moetool stats file, or of a newer schema.
        """
        from moetool.io.jsonfile import load_json_file

        hint = "pass the routing-stats.json that `moetool profile-routing --out DIR` wrote"
        doc = load_json_file(path, what="routing stats file", error=MoetoolError, hint=hint)
        if not isinstance(doc, dict) or doc.get("kind") != STATS_KIND:
            raise MoetoolError(f"{path} is not a moetool routing stats file", hint=hint, code="STATS_INVALID")
        if doc.get("schema_version") != SCHEMA_VERSION:
            raise MoetoolError(
                f"{path} has stats schema {doc.get('schema_version')}, this moetool reads {SCHEMA_VERSION}",
                hint="re-run profile-routing with this version",
                code="STATS_INVALID",
            )
        domains = doc.get("domains", {})
        return cls(
            model=doc["model"],
            model_type=doc.get("model_type"),
            family=doc["family"],
            routing=doc["routing"],
            num_experts=doc["num_experts"],
            top_k=doc["top_k"],
            tokens=doc["tokens"],
            layers=[LayerStats.from_json(layer, domains) for layer in doc["layers"]],
            domain_tokens={name: entry["tokens"] for name, entry in domains.items()},
            dataset=doc.get("dataset", {}),
            revision=doc.get("revision"),
            wall_seconds=doc.get("wall_seconds"),
            capacity=doc.get("capacity"),
        )


def _finite(value: Any) -> Any:
    """Replace NaN/inf (undefined metrics) with None so the file stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def layer_stats_from(layer: int, acc: LayerAccumulator, domain_names: list[str]) -> LayerStats:
    """Freeze an accumulator into a :class:`LayerStats`."""
    tokens = acc.tokens
    per_token = (lambda x: float(x) / tokens) if tokens else (lambda x: math.nan)
    domain_counts = {name: acc.domain_counts[i].tolist() for i, name in enumerate(domain_names)}
    return LayerStats(
        layer=layer,
        tokens=tokens,
        top_k=acc.top_k,
        counts=acc.counts.tolist(),
        prob_mean=[float(p) / tokens if tokens else math.nan for p in acc.prob_sum.tolist()],
        coactivation=[[round(v) for v in row] for row in acc.coactivation.tolist()],
        dropped={
            str(factor): (float(acc.dropped[i]) / acc.assignments if acc.assignments else math.nan)
            for i, factor in enumerate(CAPACITY_FACTORS)
        },
        z_loss=per_token(acc.z_sum),
        top1_prob=per_token(acc.top1_sum),
        top1_top2_margin=per_token(acc.margin_sum),
        domain_counts=domain_counts,
        model_kept=acc.kept.tolist() if acc.kept is not None else None,
    )
