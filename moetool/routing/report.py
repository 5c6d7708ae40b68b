"""Files a routing profile is written as: stats JSON, the EPLB-style CSV, PNG heatmaps, one HTML report.

Every plot names its axes, labels experts and layers on the ticks, has a colorbar that says what the
colour measures, keeps the figure title clear of the panel titles (matplotlib's constrained layout),
and says so in the colorbar label when values are clipped. The HTML report explains each metric in
a sentence beside the table.
"""

from __future__ import annotations

import base64
import csv
import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moetool.routing.stats import STATS_FILE, RoutingStats

COUNTS_CSV = "expert_counts.csv"
LOAD_PNG = "load_heatmap.png"
COACTIVATION_PNG = "coactivation.png"
DOMAINS_PNG = "domain_load.png"
REPORT_HTML = "report.html"

# Per-domain preference is a ratio to the overall load, drawn on a log scale between these bounds
# (1/4x to 4x); a ratio outside them is drawn at the bound and the colorbar says so.
_RATIO_MIN, _RATIO_MAX = 0.25, 4.0
# At most this many tick labels per axis; beyond it every n-th expert is labelled.
_MAX_TICKS = 32

# One sentence per metric: shown under the HTML table and as the column headers' tooltips.
METRIC_HELP: dict[str, str] = {
    "tokens": "Real (non-padding) tokens the layer routed.",
    "CV": "Coefficient of variation of the per-expert token counts (standard deviation over mean): 0 is a "
    "perfectly even load, higher means some experts take far more tokens than others.",
    "entropy": "Entropy of the load distribution divided by log(number of experts): 1 is perfectly even, 0 means "
    "one expert takes everything.",
    "max/mean": "Tokens of the busiest expert over the mean per expert: how overloaded the hottest expert is "
    "(1 is even); with expert parallelism it sets the slowest device's share.",
    "Gini": "Gini coefficient of the load: 0 is even, (N-1)/N means one expert takes all tokens.",
    "dead": "Experts that no token chose in this layer (candidates for pruning, or a routing problem).",
    "aux loss": "The Switch Transformer load-balancing loss N x sum_i f_i P_i (f: share of tokens, P: mean router "
    "probability), as transformers computes it: it equals top-k at perfect balance and grows as the load and the "
    "router's probabilities concentrate on the same experts.",
    "z-loss": "Mean squared log-sum-exp of the router logits (the ST-MoE router z-loss): large values mean large "
    "logits and an over-confident, numerically fragile router.",
    "drop@1.0": "Share of expert assignments a capacity-limited implementation would drop at capacity factor 1.0 "
    "(each expert takes at most top-k x tokens / N per window of --seq-len tokens).",
    "drop@1.25": "The same at capacity factor 1.25 (25% slack per expert).",
    "top-1 prob": "Mean router probability of each token's first choice: near 1 is a confident router, near 1/N "
    "an undecided one.",
    "margin": "Mean gap between the router probabilities of the first and second choice.",
    "domain JS": "Mean Jensen-Shannon divergence (base 2, 0 to 1) between the domains' expert distributions: 0 "
    "means every domain uses the experts alike, 1 means disjoint experts.",
}


def write_counts_csv(stats: RoutingStats, path: Path) -> None:
    """The ``[layers, experts]`` token-count matrix, one row per MoE layer (what EPLB takes)."""
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["layer", *[f"expert_{e}" for e in range(stats.num_experts)]])
        for layer in stats.layers:
            writer.writerow([layer.layer, *layer.counts])


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _expert_ticks(ax: Any, num_experts: int, *, axis: str = "x") -> None:
    """Tick labels e0, e1, ... (every n-th expert when there are many)."""
    step = max(1, math.ceil(num_experts / _MAX_TICKS))
    positions = list(range(0, num_experts, step))
    labels = [f"e{e}" for e in positions]
    rotation = 90 if num_experts > 16 else 0
    if axis == "x":
        ax.set_xticks(positions, labels, rotation=rotation, fontsize=8)
    else:
        ax.set_yticks(positions, labels, fontsize=8)


def _layer_ticks(ax: Any, layers: Sequence[int]) -> None:
    step = max(1, math.ceil(len(layers) / _MAX_TICKS))
    positions = list(range(0, len(layers), step))
    ax.set_yticks(positions, [str(layers[i]) for i in positions], fontsize=8)


def _annotate(ax: Any, matrix: list[list[float]], fmt: str, threshold: float) -> None:
    """Write each cell's value on small heatmaps (dark text on light cells, light on dark)."""
    for row, values in enumerate(matrix):
        for col, value in enumerate(values):
            color = "black" if value >= threshold else "white"
            ax.text(col, row, format(value, fmt), ha="center", va="center", fontsize=7, color=color)


def plot_load_heatmap(stats: RoutingStats, path: Path) -> None:
    """Per-layer expert load, as a share of the layer's routed assignments (values written on small maps)."""
    plt = _pyplot()
    matrix = [layer.fractions for layer in stats.layers]
    layers = [layer.layer for layer in stats.layers]
    width = max(5.0, 0.45 * min(stats.num_experts, 64) + 2.5)
    height = max(2.8, 0.4 * min(len(matrix), 64) + 1.6)
    fig, ax = plt.subplots(figsize=(width, height), layout="constrained")
    peak = max((max(row) for row in matrix if row), default=0.0) or 1.0
    image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0, vmax=peak, interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    _expert_ticks(ax, stats.num_experts)
    _layer_ticks(ax, layers)
    if stats.num_experts <= 16 and len(matrix) <= 32:
        _annotate(ax, [[100 * v for v in row] for row in matrix], ".0f", threshold=60 * peak)
    uniform = 1 / stats.num_experts if stats.num_experts else 0.0
    ax.set_title(
        f"Expert load: {stats.tokens:,} tokens, top-{stats.top_k}\n"
        f"(even load = {100 * uniform:.1f}% per expert; cells in %)",
        fontsize=10,
    )
    bar = fig.colorbar(image, ax=ax)
    bar.set_label("share of the layer's routed assignments")
    bar.ax.yaxis.set_major_formatter(_percent_formatter())
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _percent_formatter() -> Any:
    from matplotlib.ticker import PercentFormatter

    return PercentFormatter(xmax=1.0, decimals=0)


def plot_coactivation(stats: RoutingStats, path: Path, max_layers: int = 8) -> None:
    """How often two experts are chosen for the same token, per layer (share of the layer's tokens).

    All panels share one colour scale, so layers compare directly; the diagonal (an expert with
    itself, which is its load) is left blank.
    """
    plt = _pyplot()
    layers = stats.layers[:max_layers]
    cols = min(4, len(layers))
    rows = (len(layers) + cols - 1) // cols
    panel = max(2.6, 0.22 * min(stats.num_experts, 64) + 1.2)
    fig, axes = plt.subplots(
        rows, cols, figsize=(panel * cols + 1.4, panel * rows + 0.9), squeeze=False, layout="constrained"
    )
    matrices = []
    for layer in layers:
        tokens = max(layer.tokens, 1)
        matrix = [[v / tokens for v in row] for row in layer.coactivation]
        for e in range(len(matrix)):
            matrix[e][e] = math.nan  # the diagonal is the load itself; show only pairs
        matrices.append(matrix)
    peak = max((v for m in matrices for row in m for v in row if not math.isnan(v)), default=0.0) or 1.0
    cmap = plt.get_cmap("magma").copy()
    cmap.set_bad("#dddddd")
    image = None
    for ax in axes.flat:
        ax.set_visible(False)
    for index, (ax, layer, matrix) in enumerate(zip(axes.flat, layers, matrices, strict=False)):
        ax.set_visible(True)
        image = ax.imshow(matrix, cmap=cmap, vmin=0, vmax=peak, interpolation="nearest")
        ax.set_title(f"layer {layer.layer}", fontsize=9)
        _expert_ticks(ax, layer.num_experts, axis="x")
        _expert_ticks(ax, layer.num_experts, axis="y")
        if index // cols == rows - 1 or index + cols >= len(layers):
            ax.set_xlabel("expert", fontsize=8)
        if index % cols == 0:
            ax.set_ylabel("expert", fontsize=8)
    if image is not None:
        bar = fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.9)
        bar.set_label("share of tokens routed to both experts")
        bar.ax.yaxis.set_major_formatter(_percent_formatter())
    shown = "" if len(stats.layers) <= max_layers else f" (first {max_layers} of {len(stats.layers)} MoE layers)"
    fig.suptitle(f"Expert co-activation: pairs chosen for the same token{shown}; grey = the expert itself", fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def domain_ratios(stats: RoutingStats, domain: str) -> list[list[float]]:
    """Each layer's ratio of the domain's expert shares to the overall shares (1 = same as overall).

    An expert no token used overall gets ratio 1 (nothing to compare).
    """
    matrix = []
    for layer in stats.layers:
        counts = layer.domain_counts[domain]
        total = sum(counts) or 1
        matrix.append([(c / total) / f if f else 1.0 for c, f in zip(counts, layer.fractions, strict=True)])
    return matrix


def plot_domains(stats: RoutingStats, path: Path) -> None:
    """Each domain's expert distribution as the ratio to the overall load, on a log colour scale.

    Ratios beyond 1/4x or 4x are drawn at the bound; the colorbar's arrow ends and label say so.
    """
    plt = _pyplot()
    from matplotlib.colors import LogNorm

    domains = list(stats.domain_tokens)
    layers = [layer.layer for layer in stats.layers]
    panel_w = max(2.6, 0.3 * min(stats.num_experts, 64) + 1.0)
    fig, axes = plt.subplots(
        1,
        len(domains),
        figsize=(panel_w * len(domains) + 1.6, max(2.8, 0.35 * len(layers) + 1.8)),
        squeeze=False,
        layout="constrained",
    )
    norm = LogNorm(vmin=_RATIO_MIN, vmax=_RATIO_MAX)
    clipped_low = clipped_high = False
    image = None
    for index, (ax, domain) in enumerate(zip(axes[0], domains, strict=True)):
        ratios = domain_ratios(stats, domain)
        clipped_low |= any(v < _RATIO_MIN for row in ratios for v in row)
        clipped_high |= any(v > _RATIO_MAX for row in ratios for v in row)
        drawn = [[min(max(v, _RATIO_MIN), _RATIO_MAX) for v in row] for row in ratios]
        image = ax.imshow(drawn, aspect="auto", cmap="coolwarm", norm=norm, interpolation="nearest")
        ax.set_title(f"{domain}\n({stats.domain_tokens[domain]:,} tokens)", fontsize=9)
        ax.set_xlabel("expert", fontsize=8)
        _expert_ticks(ax, stats.num_experts)
        if index == 0:
            ax.set_ylabel("MoE layer")
            _layer_ticks(ax, layers)
        else:
            ax.set_yticks([])
    if image is not None:
        extend = {(True, True): "both", (True, False): "min", (False, True): "max"}.get(
            (clipped_low, clipped_high), "neither"
        )
        bar = fig.colorbar(image, ax=axes[0].tolist(), extend=extend)
        ticks = [0.25, 0.5, 1.0, 2.0, 4.0]
        bar.set_ticks(ticks, labels=["¼×", "½×", "1×", "2×", "4×"])
        bar.minorticks_off()
        label = "domain's share / overall share"
        if clipped_low or clipped_high:
            label += "\n(clipped to ¼×–4×)"
        bar.set_label(label)
    fig.suptitle("Per-domain expert preference (1× = same as overall; red: used more by the domain)", fontsize=10)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt(value: float, spec: str) -> str:
    return "n/a" if isinstance(value, float) and not math.isfinite(value) else format(value, spec)


def write_html_report(stats: RoutingStats, folder: Path, images: list[str]) -> None:
    """One self-contained HTML page: what was profiled, the metrics table with a sentence per metric,
    and the PNGs embedded as data URIs, each with a caption saying how to read it."""
    from moetool.versions import versions

    has_domains = bool(stats.domain_tokens)
    columns = [
        ("layer", None),
        ("tokens", lambda layer: f"{layer.tokens:,}"),
        ("CV", lambda layer: _fmt(layer.cv, ".3f")),
        ("entropy", lambda layer: _fmt(layer.entropy, ".3f")),
        ("max/mean", lambda layer: _fmt(layer.max_mean, ".2f")),
        ("Gini", lambda layer: _fmt(layer.gini, ".3f")),
        ("dead", lambda layer: str(len(layer.dead_experts))),
        ("aux loss", lambda layer: _fmt(layer.aux_loss, ".4f")),
        ("z-loss", lambda layer: _fmt(layer.z_loss, ".3f")),
        ("drop@1.0", lambda layer: _fmt(100 * layer.dropped["1.0"], ".1f") + "%"),
        ("drop@1.25", lambda layer: _fmt(100 * layer.dropped["1.25"], ".1f") + "%"),
        ("top-1 prob", lambda layer: _fmt(layer.top1_prob, ".3f")),
        ("margin", lambda layer: _fmt(layer.top1_top2_margin, ".3f")),
    ]
    if has_domains:
        columns.append(("domain JS", lambda layer: _fmt(layer.domain_js, ".3f")))
    headers = "".join(
        f'<th scope="col" title="{html.escape(METRIC_HELP.get(name, ""))}">{html.escape(name)}</th>'
        for name, _ in columns
    )
    rows = "\n".join(
        f'<tr><th scope="row">{layer.layer}</th>'
        + "".join(f"<td>{html.escape(cell(layer))}</td>" for _, cell in columns[1:])
        + "</tr>"
        for layer in stats.layers
    )
    glossary = "\n".join(
        f"<dt>{html.escape(name)}</dt><dd>{html.escape(METRIC_HELP[name])}</dd>"
        for name, _ in columns[1:]
        if name in METRIC_HELP
    )
    captions = {
        LOAD_PNG: "Share of each layer's routed assignments that each expert receives (cells in %). An even load "
        f"puts {100 / max(stats.num_experts, 1):.1f}% on every expert; bright cells are hot experts, dark ones "
        "rarely chosen.",
        COACTIVATION_PNG: "For each pair of experts, the share of tokens that chose both (with top-k routing each "
        "token chooses k experts). Bright pairs work together; the grey diagonal is each expert with itself.",
        DOMAINS_PNG: "For each domain, an expert's share of that domain's assignments divided by its share overall: "
        "red experts are preferred by the domain, blue ones avoided, white ones used as often as overall. The "
        "colour scale is logarithmic and stops at ¼× and 4×; stronger ratios are drawn at those ends.",
    }
    figures = "\n".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,'
        f'{base64.b64encode((folder / name).read_bytes()).decode()}">'
        f"<figcaption>{html.escape(captions.get(name, name))}</figcaption></figure>"
        for name in images
    )
    dataset = stats.dataset or {}
    source = html.escape(str(dataset.get("dataset", "—")))
    split = dataset.get("split")
    source += f" (split {html.escape(str(split))})" if split else ""
    versions_text = ", ".join(f"{k} {v}" for k, v in versions().items() if v)
    revision = f" at revision <code>{html.escape(stats.revision)}</code>" if stats.revision else ""
    aux = _fmt(stats.aux_loss, ".4f")
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>moetool routing profile: {html.escape(stats.model)}</title>
<style>
body{{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:1200px;padding:0 1em;
color:#222;line-height:1.45}}
h1{{margin-bottom:.2em}} .lead{{color:#444;margin-top:0}}
.scroll{{overflow-x:auto}} table{{border-collapse:collapse;font-variant-numeric:tabular-nums}}
table{{font-size:.92em}} td,th{{border:1px solid #ccc;padding:3px 7px;text-align:right}}
thead th{{background:#f3f3f3;cursor:help;white-space:nowrap}}
tbody th{{background:#fafafa}}
dl{{display:grid;grid-template-columns:max-content 1fr;gap:.3em 1em}} dt{{font-weight:600}} dd{{margin:0}}
figure{{margin:1.5em 0}} img{{max-width:100%;border:1px solid #eee}} figcaption{{color:#444;font-size:.95em}}
footer{{color:#666;font-size:.85em;margin-top:2em}}
</style></head>
<body>
<h1>Routing profile</h1>
<p class="lead"><b>{html.escape(stats.model)}</b>{revision} ({html.escape(str(stats.model_type))}, routing
{html.escape(stats.routing)}): {stats.tokens:,} tokens of {source}, {stats.num_experts} experts, top-{stats.top_k},
{len(stats.layers)} MoE layers. Overall Switch auxiliary loss {aux} (perfect balance gives {stats.top_k}).</p>
<h2>Per layer</h2>
<div class="scroll"><table><thead><tr>{headers}</tr></thead>
<tbody>
{rows}
</tbody></table></div>
<h2>What the columns mean</h2>
<dl>
{glossary}
</dl>
<h2>Plots</h2>
{figures}
<footer>Written by moetool ({html.escape(versions_text)}). Data: <code>{STATS_FILE}</code> (every figure above, and
the raw counts), <code>{COUNTS_CSV}</code> (the [layers, experts] token counts DeepSeek's EPLB takes).</footer>
</body></html>
"""
    (folder / REPORT_HTML).write_text(page, encoding="utf-8")


def write_report_folder(stats: RoutingStats, folder: Path, *, plots: bool = True) -> list[str]:
    """Write every output file into ``folder`` (which must exist); return their names."""
    stats.save(folder / STATS_FILE)
    write_counts_csv(stats, folder / COUNTS_CSV)
    written = [STATS_FILE, COUNTS_CSV]
    if plots and stats.layers:
        images = [LOAD_PNG, COACTIVATION_PNG]
        plot_load_heatmap(stats, folder / LOAD_PNG)
        plot_coactivation(stats, folder / COACTIVATION_PNG)
        if stats.domain_tokens:
            plot_domains(stats, folder / DOMAINS_PNG)
            images.append(DOMAINS_PNG)
        write_html_report(stats, folder, images)
        written += [*images, REPORT_HTML]
    return written
