"""``moetool profile-routing``: which experts a model's routers choose on a dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from moetool.cli import options
from moetool.cli._errors import handle_errors, report_error
from moetool.cli._output import human_count, print_json, stderr, stdout, warn
from moetool.cli._progress import progress_enabled, status, token_progress
from moetool.cli._threads import use_threads

EXAMPLES = """
Examples:

  moetool profile-routing examples/tiny-moe -d examples/data/heldout.jsonl --domain-field domain

  moetool profile-routing examples/tiny-moe -d corpus.txt --out routing/ --fail-if 'cv>0.5' --fail-if 'dead>=1'

  moetool profile-routing ./model -d data.jsonl --json > routing.json
"""


@handle_errors
def profile_routing_cmd(
    model: options.ModelArg,
    dataset: options.DatasetOpt,
    text_field: options.TextFieldOpt = "text",
    domain_field: options.DomainFieldOpt = None,
    split: options.SplitOpt = "train",
    data_files: options.DataFilesOpt = None,
    dataset_config: options.DatasetConfigOpt = None,
    max_tokens: options.MaxTokensOpt = 50_000,
    seq_len: options.SeqLenOpt = 256,
    batch_size: options.BatchSizeOpt = 8,
    device: options.DeviceOpt = "auto",
    dtype: options.DtypeOpt = "auto",
    device_map: options.DeviceMapOpt = "none",
    threads: options.ThreadsOpt = 0,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="Write routing-stats.json (read by merge and quantize), expert_counts.csv, PNG heatmaps and "
            "report.html into this new folder.",
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out folder.")] = False,
    fail_if: Annotated[
        list[str] | None,
        typer.Option(
            "--fail-if",
            help="Exit 3 when a layer meets this condition, e.g. 'cv>0.5', 'dead>=1', 'drop@1.25>0.05' "
            "(repeatable). Metrics: cv, entropy, max_mean, gini, dead, aux_loss, z_loss, top1_prob, "
            "top1_top2_margin, domain_js, drop@1.0|1.25|1.5|2.0.",
        ),
    ] = None,
    revision: options.RevisionOpt = None,
    json_output: options.JsonOpt = False,
) -> None:
    """Profile router expert utilisation per layer: loads, balance metrics, capacity drops, co-activation.

    The model runs through transformers; hooks at each router record exactly the experts the model
    itself chooses. Per-domain breakdowns with --domain-field.
    """
    from moetool.data import iter_batches, iter_windows, load_documents
    from moetool.errors import ThresholdFailedError
    from moetool.modeling import load_model
    from moetool.routing.profile import profile_routing
    from moetool.routing.thresholds import check_thresholds, parse_threshold

    thresholds = [parse_threshold(text) for text in fail_if or []]
    inputs: list[Path] = []
    if out is not None:
        from moetool.io.source import parse_model_ref
        from moetool.io.writer import check_output_path

        local = parse_model_ref(model, revision=revision).local_path
        inputs = [local] if local is not None else []
        check_output_path(out, inputs, overwrite=overwrite)
    documents = load_documents(
        dataset,
        text_field=text_field,
        domain_field=domain_field,
        split=split,
        data_files=data_files,
        config_name=dataset_config,
    )
    domains = sorted({d.domain for d in documents if d.domain is not None})
    threads_used = use_threads(threads, json_output=json_output)
    with status(f"loading {model}", enabled=progress_enabled(json_output)):
        loaded_model, tokenizer, checkpoint = load_model(
            model, device=device, dtype=dtype, revision=revision, device_map=device_map
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    windows = iter_windows(tokenizer, documents, seq_len=seq_len, max_tokens=max_tokens or None)
    batches = iter_batches(windows, batch_size=batch_size, pad_id=pad_id)
    description = {
        "dataset": dataset,
        "split": split,
        "text_field": text_field,
        "domain_field": domain_field,
        "seq_len": seq_len,
        "max_tokens": max_tokens,
        "documents": len(documents),
    }
    with token_progress("routing", max_tokens or None, enabled=progress_enabled(json_output)) as advance:
        stats = profile_routing(
            loaded_model, batches, domains=domains, name=model, dataset=description, on_batch=advance
        )
    stats.revision = checkpoint.revision
    if stats.tokens == 0:
        warn("the dataset produced no tokens to route")

    if out is not None:
        from moetool.io.writer import staged_output
        from moetool.routing.report import write_report_folder

        with staged_output(out, inputs=inputs, overwrite=overwrite) as staging:
            written = write_report_folder(stats, staging)
        stderr().print(f"wrote {', '.join(written)} to {out}", highlight=False)

    violations = check_thresholds(stats, thresholds)
    if json_output:
        doc = stats.to_json()
        doc["threads"] = threads_used
        doc["threshold_violations"] = [
            {"layer": v.layer, "metric": v.threshold.metric, "observed": v.observed, "rule": v.threshold.text}
            for v in violations
        ]
        print_json(doc)
    else:
        render(stats)
    if violations:
        for violation in violations:
            stderr().print(f"[bold red]threshold:[/bold red] {violation}", highlight=False)
        # The results are already on stdout (one JSON document with the violations): report, exit 3.
        report_error(
            ThresholdFailedError(
                f"{len(violations)} threshold violation(s) in {len({v.layer for v in violations})} layer(s)",
                hint="see the lines above; adjust the model or the --fail-if limits",
            )
        )
        raise typer.Exit(ThresholdFailedError.exit_code)


_BLOCKS = " ▁▂▃▄▅▆▇█"


def _heat_row(fractions: list[float], uniform: float) -> Text:
    """One layer's load as coloured blocks: height = load, red above uniform, blue below."""
    text = Text()
    peak = max(fractions) if fractions else 0.0
    for f in fractions:
        level = round(8 * f / peak) if peak else 0
        style = "red" if f > 1.5 * uniform else ("blue" if f < 0.5 * uniform else "green")
        text.append(_BLOCKS[level], style=style)
    return text


def render(stats) -> None:
    """Terminal summary: per-layer metrics, a load heatmap, and per-domain divergence."""
    console = stdout()
    console.print(
        f"[bold]{stats.model}[/bold]  {stats.tokens:,} tokens, {stats.num_experts} experts, top-{stats.top_k}, "
        f"{len(stats.layers)} MoE layers, routing {stats.routing}; overall aux loss {stats.aux_loss:.4f}",
        highlight=False,
    )
    table = Table(show_edge=False, title="Per layer", title_justify="left")
    for column in (
        "layer",
        "load (blocks: experts)",
        "CV",
        "entropy",
        "max/mean",
        "Gini",
        "dead",
        "aux",
        "z-loss",
        "drop@1.0",
        "drop@1.25",
        "top-1 p",
        "margin",
    ):
        table.add_column(column, justify="left" if column.startswith("load") else "right")
    uniform = 1 / stats.num_experts if stats.num_experts else 0
    for layer in stats.layers:
        table.add_row(
            str(layer.layer),
            _heat_row(layer.fractions, uniform),
            f"{layer.cv:.3f}",
            f"{layer.entropy:.3f}",
            f"{layer.max_mean:.2f}",
            f"{layer.gini:.3f}",
            str(len(layer.dead_experts)),
            f"{layer.aux_loss:.3f}",
            f"{layer.z_loss:.2f}",
            f"{100 * layer.dropped['1.0']:.1f}%",
            f"{100 * layer.dropped['1.25']:.1f}%",
            f"{layer.top1_prob:.3f}",
            f"{layer.top1_top2_margin:.3f}",
        )
    console.print(table)
    if stats.domain_tokens:
        domains = Table(
            show_edge=False, title="Per domain (share of each expert, mean over layers)", title_justify="left"
        )
        domains.add_column("domain")
        domains.add_column("tokens", justify="right")
        domains.add_column("JS vs other domains", justify="right")
        domains.add_column("most used experts (layer: expert share)")
        from moetool.routing.metrics import fractions, js_divergence

        for name, tokens in stats.domain_tokens.items():
            divergences = []
            favourites = []
            for layer in stats.layers:
                own = layer.domain_counts[name]
                rest = [sum(c) - o for c, o in zip(zip(*layer.domain_counts.values(), strict=True), own, strict=True)]
                divergences.append(js_divergence(own, rest) if sum(rest) else 0.0)
                shares = fractions(own)
                top = max(range(len(shares)), key=shares.__getitem__) if shares else 0
                favourites.append(f"{layer.layer}:e{top} {shares[top]:.0%}" if shares else "-")
            mean_js = sum(divergences) / len(divergences) if divergences else 0.0
            domains.add_row(name, human_count(tokens), f"{mean_js:.3f}", "  ".join(favourites[:6]))
        console.print(domains)
