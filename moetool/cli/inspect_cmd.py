"""``moetool inspect``: total and active parameters of a checkpoint, by category and layer."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from moetool.arch.spec import CATEGORIES
from moetool.cli import options
from moetool.cli._errors import handle_errors, report_error
from moetool.cli._output import human_bytes, human_count, print_json, printable, stdout, warn
from moetool.cli._progress import progress_enabled, status
from moetool.count.params import ParamReport, count_from_checkpoint, count_from_config
from moetool.errors import MoetoolError, NonfiniteError, UsageError

EXAMPLES = """
Examples:

  moetool inspect examples/tiny-moe

  moetool inspect mistralai/Mixtral-8x7B-v0.1 --json

  moetool inspect ./my-model --layers

  moetool inspect ./my-model --scan-nonfinite --strict
"""


@handle_errors
def inspect(
    model: options.ModelArg,
    revision: options.RevisionOpt = None,
    json_output: options.JsonOpt = False,
    layers: Annotated[bool, typer.Option("--layers", "-l", help="Also break the counts down per layer.")] = False,
    config_only: Annotated[
        bool,
        typer.Option("--config-only", help="Count from config.json alone, even when weights are present."),
    ] = False,
    token: options.TokenOpt = None,
    offline: options.OfflineOpt = False,
    memory: Annotated[
        bool,
        typer.Option(
            "--memory",
            help="Also estimate what running the model holds: weights per dtype, the largest layer, activations.",
        ),
    ] = False,
    memory_tokens: Annotated[
        int,
        typer.Option("--memory-tokens", min=1, help="Token positions of one pass, for the activation estimate."),
    ] = 65536,
    scan_nonfinite: Annotated[
        bool,
        typer.Option(
            "--scan-nonfinite",
            help="Also read every float tensor and count its NaN and Inf values (reads all the weights; local "
            "checkpoints only).",
        ),
    ] = False,
    strict: Annotated[
        bool,
        typer.Option(
            "--strict",
            help="Exit 1 when the checkpoint has a problem the other commands refuse (config and tensors "
            "disagree, missing experts, NaN/Inf with --scan-nonfinite), after printing the report.",
        ),
    ] = False,
) -> None:
    """Count total and active (per-token) parameters, from safetensors headers or config.json.

    No tensor data is read (unless --scan-nonfinite): local checkpoints need only their headers, Hub repos
    only config.json and the headers (fetched remotely). Config fields of the wrong type, tensors whose
    shapes the config does not imply, missing experts and an impossible top-k are reported as warnings.
    --memory estimates what running the model holds at once, streamed one decoder layer at a time (what
    every moetool command does) and whole.
    """
    from moetool.io.checkpoint import load_config
    from moetool.io.source import open_model, parse_model_ref

    ref = parse_model_ref(model, revision=revision)
    checkpoint = None
    if scan_nonfinite and (config_only or ref.local_path is None):
        raise UsageError(
            "--scan-nonfinite reads the weights: it needs a local checkpoint and no --config-only",
            hint="download the checkpoint (hf download REPO --local-dir DIR) and pass DIR",
        )
    if config_only and ref.local_path is not None:
        # config.json is all this needs: skip reading (and validating) the weight headers.
        config = load_config(ref.local_path)
        report = count_from_config(config, name=model)
        report.revision = ref.revision
    else:
        checkpoint = open_model(model, revision=revision, token=token, offline=offline or None, need_weights=False)
        config = checkpoint.config
        if config_only:
            report = count_from_config(checkpoint.config, name=checkpoint.name)
            report.revision = checkpoint.revision
        else:
            report = count_from_checkpoint(checkpoint)
            if scan_nonfinite:
                from moetool.io.nonfinite import scan_checkpoint

                with status("scanning the weights for NaN/Inf", enabled=progress_enabled(json_output)):
                    report.nonfinite = scan_checkpoint(checkpoint)
    estimates = None
    if memory:
        from moetool.runner.memory import estimate, estimate_from_counts

        if checkpoint is not None and checkpoint.tensors and not config_only:
            estimates = {dtype: estimate(checkpoint, dtype) for dtype in ("float32", "bfloat16")}
        elif report.layers:
            # No headers: the same figures from the config-only count (dtypes on disk assumed).
            estimates = {dtype: estimate_from_counts(report, config, dtype) for dtype in ("float32", "bfloat16")}
        else:
            warn("--memory: no decoder layers were counted, so there is nothing to estimate")
    problem = _strict_error(report, model) if strict else None
    if json_output:
        doc = report.to_json(per_layer=layers)
        if memory:
            doc["memory"] = None if estimates is None else {k: v.to_json(memory_tokens) for k, v in estimates.items()}
        print_json(doc)
    else:
        for message in report.warnings:
            warn(message)
        for finding in report.findings:
            warn(finding.message)
        if report.nonfinite:
            from moetool.io.nonfinite import describe

            warn(describe(report.nonfinite))
        render(report, per_layer=layers)
        if estimates is not None:
            render_memory(estimates, memory_tokens)
    if problem is not None:
        # The report is on stdout already (one JSON document in --json mode): the error is a line.
        report_error(problem)
        raise typer.Exit(problem.exit_code)


def _strict_error(report: ParamReport, model: str) -> MoetoolError | None:
    """What --strict refuses: the findings commands refuse, and NaN/Inf."""
    from moetool.validate import as_error

    error = as_error(report.findings, model)
    if error is None and report.nonfinite:
        from moetool.io.nonfinite import describe

        error = NonfiniteError(f"{model}: {describe(report.nonfinite)}", hint="the weights are corrupt")
    return error


# Rows of the non-finite table before it only gives a count.
_NONFINITE_ROWS = 20


def render_memory(estimates: dict, tokens: int) -> None:
    """What running the model holds at once, per compute dtype: streamed (one layer) and whole."""
    from moetool.runner.memory import FIXED_OVERHEAD_BYTES

    console = stdout()
    table = Table(title=f"Memory to run it, {tokens:,}-token pass", title_justify="left", show_edge=False)
    table.add_column("")
    for dtype in estimates:
        table.add_column(dtype, justify="right")
    rows = [
        ("all weights", lambda e: e.weights_by_dtype[e.dtype]),
        ("largest layer", lambda e: e.largest_layer_bytes),
        ("embedding / head", lambda e: max(e.embedding_bytes, e.head_bytes)),
        ("activations", lambda e: e.activations(tokens)),
        ("peak, streamed", lambda e: e.streamed_peak(tokens)),
        ("peak, whole model", lambda e: e.whole_peak(tokens)),
    ]
    for label, value in rows:
        table.add_row(label, *(human_bytes(value(e)) for e in estimates.values()))
    console.print(table)
    first = next(iter(estimates.values()))
    console.print(
        f"[dim]{first.layers} layers (largest: {first.largest_layer}); peaks include a fixed "
        f"{human_bytes(FIXED_OVERHEAD_BYTES)} for the process; streamed = one decoder layer at a time[/dim]",
        highlight=False,
    )
    for note in first.notes:
        console.print(f"[dim]{escape(note)}[/dim]", highlight=False)


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def render(report: ParamReport, *, per_layer: bool = False) -> None:
    """Print the human-readable report on stdout."""
    console = stdout()
    source = "safetensors headers" if report.source == "safetensors" else "config.json only"
    title = (
        f"[bold]{escape(printable(report.model))}[/bold]  "
        f"({escape(printable(report.model_type or report.family))}, counted from {source})"
    )
    console.print(title, highlight=False)

    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="dim")
    summary.add_column(justify="right", style="bold")
    summary.add_column()
    summary.add_row("total parameters", human_count(report.total_params), f"{report.total_params:,}")
    if report.categories["mtp"].total:
        summary.add_row(
            "stored incl. MTP", human_count(report.total_params_with_mtp), f"{report.total_params_with_mtp:,}"
        )
    summary.add_row("active per token", human_count(report.active_params), "incl. input embedding and lm_head")
    summary.add_row(
        "active w/o embedding",
        human_count(report.active_params_without_embedding),
        "DeepSeek / gpt-oss convention",
    )
    if report.is_moe:
        experts = f"{report.num_experts} routed, top-{report.top_k}"
        if report.num_shared_experts:
            experts += f", {report.num_shared_experts} shared"
        summary.add_row("experts", experts, f"routing: {report.routing}")
        summary.add_row("MoE layers", f"{len(report.moe_layers)}/{report.num_layers}", "")
    else:
        summary.add_row("layers", str(report.num_layers), "dense model: active = total")
    if report.quantization:
        summary.add_row("quantization", report.quantization, "parameters counted unpacked")
    console.print(summary)

    table = Table(title="Parameters by category", title_justify="left", show_edge=False)
    table.add_column("category")
    table.add_column("total", justify="right")
    table.add_column("active", justify="right")
    table.add_column("share of total", justify="right")
    for name in CATEGORIES:
        count = report.categories[name]
        if count.total:
            table.add_row(
                name,
                human_count(count.total),
                human_count(count.active),
                _pct(count.total, report.total_params_with_mtp),
            )
    console.print(table)

    if report.dtype_bytes:
        storage = Table(title="Stored bytes by dtype", title_justify="left", show_edge=False)
        storage.add_column("dtype")
        storage.add_column("bytes", justify="right")
        for dtype, size in sorted(report.dtype_bytes.items(), key=lambda kv: -kv[1]):
            storage.add_row(dtype, human_bytes(size))
        storage.add_row("[bold]total[/bold]", f"[bold]{human_bytes(report.total_bytes)}[/bold]")
        console.print(storage)

    if report.nonfinite:
        bad = Table(title="Non-finite values", title_justify="left", show_edge=False)
        bad.add_column("tensor")
        bad.add_column("NaN", justify="right")
        bad.add_column("Inf", justify="right")
        for hit in report.nonfinite[:_NONFINITE_ROWS]:
            bad.add_row(escape(printable(hit.tensor)), f"{hit.nan:,}", f"{hit.inf:,}")
        if len(report.nonfinite) > _NONFINITE_ROWS:
            bad.add_row(f"... and {len(report.nonfinite) - _NONFINITE_ROWS} more tensors", "", "")
        console.print(bad)
    elif report.nonfinite is not None:
        console.print("no NaN or Inf in any float tensor", style="green")

    if per_layer:
        by_layer = Table(title="Per layer", title_justify="left", show_edge=False)
        for column in (
            "layer",
            "kind",
            "experts",
            "top-k",
            "total",
            "active",
            "attention",
            "routed",
            "shared",
            "dense",
        ):
            by_layer.add_column(column, justify="right")
        for layer in report.layers:
            c = layer.categories
            by_layer.add_row(
                str(layer.index),
                layer.kind,
                str(layer.num_experts or "-"),
                str(layer.top_k or "-"),
                human_count(layer.total),
                human_count(layer.active),
                human_count(c["attention"].total),
                human_count(c["routed_experts"].total),
                human_count(c["shared_experts"].total),
                human_count(c["dense_mlp"].total),
            )
        console.print(by_layer)
