"""``moetool profile-routing``: which experts a model's routers choose on a dataset."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from moetool.cli import options
from moetool.cli._errors import handle_errors, report_error
from moetool.cli._output import human_count, print_json, quiet, stderr, stdout, warn
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
    whole_model: options.WholeModelOpt = False,
    offload_activations: options.OffloadActivationsOpt = False,
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
    token: options.TokenOpt = None,
    offline: options.OfflineOpt = False,
    json_output: options.JsonOpt = False,
) -> None:
    """Profile router expert utilisation per layer: loads, balance metrics, capacity drops, co-activation.

    The model runs through transformers, one decoder layer at a time (memory: one layer plus the
    activations, whatever the model size); hooks at each router record exactly the experts the model
    itself chooses. Per-domain breakdowns with --domain-field.
    """
    from moetool.data import iter_batches, iter_windows, load_documents, split_applies
    from moetool.errors import ThresholdFailedError
    from moetool.modeling import check_device_map, check_device_name, check_dtype_name
    from moetool.routing.profile import profile_routing
    from moetool.routing.thresholds import check_thresholds, parse_threshold
    from moetool.validate import preflight

    thresholds = [parse_threshold(text) for text in fail_if or []]
    check_device_name(device)
    check_dtype_name(dtype)
    check_device_map(device_map)
    inputs: list[Path] = []
    if out is not None:
        from moetool.io.source import parse_model_ref
        from moetool.io.writer import check_output_path

        local = parse_model_ref(model, revision=revision).local_path
        inputs = [local] if local is not None else []
        check_output_path(out, inputs, overwrite=overwrite)
    preflight(model, revision=revision)
    documents = load_documents(
        dataset,
        text_field=text_field,
        domain_field=domain_field,
        split=split,
        data_files=data_files,
        config_name=dataset_config,
    )
    domains = sorted({d.domain for d in documents if d.domain is not None})
    from moetool.cli._runner import memory_plan
    from moetool.runner.open import open_runner

    threads_used = use_threads(threads, json_output=json_output)
    with status(f"opening {model}", enabled=progress_enabled(json_output)):
        opened = open_runner(
            model,
            device=device,
            dtype=dtype,
            whole_model=whole_model,
            device_map=device_map,
            hidden="cpu" if offload_activations else "auto",
            revision=revision,
            token=token,
            offline=offline or None,
            pass_tokens=batch_size * seq_len,
        )
    tokenizer, checkpoint = opened.tokenizer, opened.checkpoint
    memory = memory_plan(opened, tokens=max_tokens or batch_size * seq_len, enabled=progress_enabled(json_output))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    windows = iter_windows(tokenizer, documents, seq_len=seq_len, max_tokens=max_tokens or None)
    batches = iter_batches(windows, batch_size=batch_size, pad_id=pad_id)
    description = {
        "dataset": dataset,
        # A split is a Hub dataset's (or a saved DatasetDict's); a local file has none.
        "split": split if split_applies(dataset) else None,
        "text_field": text_field,
        "domain_field": domain_field,
        "seq_len": seq_len,
        "max_tokens": max_tokens,
        "documents": len(documents),
    }
    with token_progress("routing", max_tokens or None, enabled=progress_enabled(json_output)) as advance:
        stats = profile_routing(
            opened.runner, batches, domains=domains, name=model, dataset=description, on_batch=advance
        )
    stats.revision = checkpoint.revision
    from moetool.runner.dist import current_ranks

    if not current_ranks(device).is_main:
        return  # every process has the summed statistics; the first one writes and reports them
    if stats.tokens == 0:
        warn("the dataset produced no tokens to route")

    if out is not None:
        from moetool.io.writer import staged_output
        from moetool.routing.report import write_report_folder

        with staged_output(out, inputs=inputs, overwrite=overwrite) as staging:
            written = write_report_folder(stats, staging)
        if not quiet():
            stderr().print(f"wrote {', '.join(written)} to {out}", highlight=False)

    violations = check_thresholds(stats, thresholds)
    if json_output:
        doc = stats.to_json()
        doc["memory"] = memory
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


# "·" is an expert no token chose (dead); any other load shows at least the lowest block.
_BLOCKS = "·▁▂▃▄▅▆▇█"
# The load column shows at most this many blocks; more experts share a block (DeepSeek-V3 has 256).
_MAX_BLOCKS = 32
# Columns in display order: (header, value). "load" is drawn separately.
_METRICS: list[tuple[str, Callable[[Any], str]]] = [
    ("CV", lambda layer: f"{layer.cv:.3f}"),
    ("entropy", lambda layer: f"{layer.entropy:.3f}"),
    ("max/mean", lambda layer: f"{layer.max_mean:.2f}"),
    ("Gini", lambda layer: f"{layer.gini:.3f}"),
    ("dead", lambda layer: str(len(layer.dead_experts))),
    ("aux", lambda layer: f"{layer.aux_loss:.3f}"),
    ("z-loss", lambda layer: f"{layer.z_loss:.2f}"),
    ("drop@1.0", lambda layer: f"{100 * layer.dropped['1.0']:.1f}%"),
    ("drop@1.25", lambda layer: f"{100 * layer.dropped['1.25']:.1f}%"),
    ("top-1 p", lambda layer: f"{layer.top1_prob:.3f}"),
    ("margin", lambda layer: f"{layer.top1_top2_margin:.3f}"),
]
# Which columns give way first when the terminal is narrow (the rest stay: layer, load, CV, dead, drop@1.0).
_DROP_ORDER = ["margin", "z-loss", "drop@1.25", "Gini", "aux", "entropy", "max/mean", "top-1 p"]


def _heat_row(fractions: list[float], uniform: float) -> Text:
    """One layer's load as coloured blocks: height = load, red above 1.5x uniform, blue below 0.5x."""
    text = Text()
    peak = max(fractions) if fractions else 0.0
    for f in fractions:
        level = max(1, round(8 * f / peak)) if f > 0 else 0
        style = "red" if f > 1.5 * uniform else ("blue" if f < 0.5 * uniform else "green")
        text.append(_BLOCKS[level], style=style)
    return text


def _binned(fractions: list[float], size: int) -> list[float]:
    return [sum(fractions[i : i + size]) for i in range(0, len(fractions), size)]


def _layer_table(stats: Any, shown: list[str], bin_size: int) -> Table:
    table = Table(show_edge=False, title="Per layer", title_justify="left")
    table.add_column("layer", justify="right", no_wrap=True)
    load_header = "load" if bin_size == 1 else f"load/{bin_size}e"
    table.add_column(load_header, justify="left", no_wrap=True)
    metrics = [(header, value) for header, value in _METRICS if header in shown]
    for header, _ in metrics:
        table.add_column(header, justify="right", no_wrap=True)
    uniform = bin_size / stats.num_experts if stats.num_experts else 0
    for layer in stats.layers:
        table.add_row(
            str(layer.layer),
            _heat_row(_binned(layer.fractions, bin_size), uniform),
            *(value(layer) for _, value in metrics),
        )
    return table


def _fit_layer_table(stats: Any, console: Console) -> tuple[Table | None, list[str], int]:
    """The widest per-layer table that fits the terminal: low-priority columns give way first.

    Returns ``(table, hidden column names, experts per load block)``; ``table`` is None when even the
    narrowest table does not fit (the caller prints one line per layer instead).
    """
    bin_size = max(1, -(-stats.num_experts // _MAX_BLOCKS))
    shown = [header for header, _ in _METRICS]
    hidden: list[str] = []
    for drop in [None, *_DROP_ORDER]:
        if drop is not None:
            shown.remove(drop)
            hidden.append(drop)
        table = _layer_table(stats, shown, bin_size)
        # Measured without a width limit: the natural width, which rich would otherwise squeeze to fit.
        if Measurement.get(console, console.options.update_width(10_000), table).maximum <= console.width:
            return table, hidden, bin_size
    return None, hidden, bin_size


def render(stats, console: Console | None = None) -> None:
    """Terminal summary: per-layer metrics with a load heatmap, and per-domain divergence.

    The per-layer table fits the terminal's width: at 80 columns it keeps the layer, the load blocks,
    CV, dead experts, the drop rate at capacity 1.0 and as many other metrics as fit (the rest are
    named below it and are all in ``--json``); a terminal too narrow even for that gets one line per
    layer.
    """
    console = console or stdout()
    console.print(
        f"[bold]{stats.model}[/bold]  {stats.tokens:,} tokens, {stats.num_experts} experts, top-{stats.top_k}, "
        f"{len(stats.layers)} MoE layers, routing {stats.routing}; overall aux loss {stats.aux_loss:.4f}",
        highlight=False,
    )
    table, hidden, bin_size = _fit_layer_table(stats, console)
    if table is not None:
        console.print(table)
        per_block = "one block per expert, e0 first" if bin_size == 1 else f"one block per {bin_size} experts"
        note = f"load: {per_block}; height = share of assignments, red > 1.5x uniform, blue < 0.5x, · = no token."
        if hidden:
            note += f" Not shown at this width: {', '.join(hidden)} (see --json or a wider terminal)."
        console.print(Text(note, style="dim"))
    else:
        for layer in stats.layers:
            values = ", ".join(f"{header} {value(layer)}" for header, value in _METRICS)
            console.print(f"layer {layer.layer}: {values}", highlight=False)
    if stats.domain_tokens:
        domains = Table(
            show_edge=False, title="Per domain (share of each expert, mean over layers)", title_justify="left"
        )
        domains.add_column("domain")
        domains.add_column("tokens", justify="right")
        domains.add_column("JS vs rest", justify="right")
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
                favourites.append(f"{layer.layer}:e{top}({shares[top]:.0%})" if shares else "-")
            mean_js = sum(divergences) / len(divergences) if divergences else 0.0
            domains.add_row(name, human_count(tokens), f"{mean_js:.3f}", "  ".join(favourites[:6]))
        console.print(domains)
