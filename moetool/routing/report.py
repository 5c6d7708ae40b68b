"""Files a routing profile is written as: stats JSON, the EPLB-style CSV, PNG heatmaps, one HTML report."""

from __future__ import annotations

import base64
import csv
import html
from pathlib import Path

from moetool.routing.stats import STATS_FILE, RoutingStats

COUNTS_CSV = "expert_counts.csv"
LOAD_PNG = "load_heatmap.png"
COACTIVATION_PNG = "coactivation.png"
DOMAINS_PNG = "domain_load.png"
REPORT_HTML = "report.html"


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


def plot_load_heatmap(stats: RoutingStats, path: Path) -> None:
    """Per-layer expert load, as a share of the layer's routed assignments."""
    plt = _pyplot()
    matrix = [layer.fractions for layer in stats.layers]
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * stats.num_experts + 2), max(2.5, 0.35 * len(matrix) + 1.5)))
    image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(len(matrix)), [str(layer.layer) for layer in stats.layers])
    ax.set_title(f"Expert load ({stats.tokens:,} tokens, top-{stats.top_k}); uniform = {1 / stats.num_experts:.3f}")
    fig.colorbar(image, ax=ax, label="share of assignments")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_coactivation(stats: RoutingStats, path: Path, max_layers: int = 8) -> None:
    """How often two experts are chosen for the same token, per layer (normalised by tokens)."""
    plt = _pyplot()
    layers = stats.layers[:max_layers]
    cols = min(4, len(layers))
    rows = (len(layers) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, layer in zip(axes.flat, layers, strict=False):
        ax.axis("on")
        tokens = max(layer.tokens, 1)
        matrix = [[v / tokens for v in row] for row in layer.coactivation]
        for e in range(len(matrix)):
            matrix[e][e] = 0.0  # the diagonal is the load itself; show only pairs
        ax.imshow(matrix, cmap="magma", vmin=0)
        ax.set_title(f"layer {layer.layer}", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Expert co-activation (share of tokens choosing both)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_domains(stats: RoutingStats, path: Path) -> None:
    """Each domain's expert distribution, as the ratio to the overall load (layers stacked)."""
    plt = _pyplot()
    domains = list(stats.domain_tokens)
    fig, axes = plt.subplots(
        1, len(domains), figsize=(3.2 * len(domains) + 1, 0.3 * len(stats.layers) + 2), squeeze=False
    )
    for ax, domain in zip(axes[0], domains, strict=True):
        matrix = []
        for layer in stats.layers:
            counts = layer.domain_counts[domain]
            total = sum(counts) or 1
            overall = layer.fractions
            matrix.append([(c / total) / f if f else 0.0 for c, f in zip(counts, overall, strict=True)])
        image = ax.imshow(matrix, aspect="auto", cmap="coolwarm", vmin=0, vmax=2)
        ax.set_title(f"{domain} ({stats.domain_tokens[domain]:,} tok)", fontsize=9)
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(stats.layers)), [str(layer.layer) for layer in stats.layers])
    fig.colorbar(image, ax=axes[0].tolist(), label="domain share / overall share")
    fig.suptitle("Per-domain expert preference (1 = same as overall)")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def write_html_report(stats: RoutingStats, folder: Path, images: list[str]) -> None:
    """One self-contained HTML page: summary table and the PNGs embedded as data URIs."""
    rows = "\n".join(
        "<tr>"
        + "".join(
            f"<td>{html.escape(str(v))}</td>"
            for v in (
                layer.layer,
                f"{layer.tokens:,}",
                f"{layer.cv:.3f}",
                f"{layer.entropy:.3f}",
                f"{layer.max_mean:.2f}",
                f"{layer.gini:.3f}",
                len(layer.dead_experts),
                f"{layer.aux_loss:.4f}",
                f"{layer.z_loss:.3f}",
                f"{100 * layer.dropped['1.0']:.1f}%",
                f"{layer.top1_prob:.3f}",
                f"{layer.domain_js:.3f}",
            )
        )
        + "</tr>"
        for layer in stats.layers
    )
    figures = "\n".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,'
        f'{base64.b64encode((folder / name).read_bytes()).decode()}"></figure>'
        for name in images
    )
    headers = "".join(
        f"<th>{h}</th>"
        for h in (
            "layer",
            "tokens",
            "CV",
            "entropy",
            "max/mean",
            "Gini",
            "dead",
            "aux loss",
            "z-loss",
            "drop@1.0",
            "top-1 prob",
            "domain JS",
        )
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>moetool routing profile: {html.escape(stats.model)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}img{{max-width:100%}}</style></head>
<body><h1>Routing profile</h1>
<p><b>{html.escape(stats.model)}</b> ({html.escape(str(stats.model_type))}, routing {html.escape(stats.routing)}):
{stats.tokens:,} tokens, {stats.num_experts} experts, top-{stats.top_k}, {len(stats.layers)} MoE layers;
overall Switch aux loss {stats.aux_loss:.4f} ({stats.top_k} = perfectly balanced with top-{stats.top_k}).</p>
<table><tr>{headers}</tr>
{rows}</table>
{figures}
<p>Written by moetool. Data: <code>{STATS_FILE}</code>, <code>{COUNTS_CSV}</code>.</p>
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
