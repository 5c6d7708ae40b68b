"""``moetool merge``: N routed experts to M per MoE layer, or all of them into one dense FFN."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from moetool.cli import options
from moetool.cli._errors import handle_errors
from moetool.cli._output import human_bytes, human_count, print_json, stderr, stdout, warn
from moetool.cli._progress import progress_enabled
from moetool.cli._push import add_push, push_output, push_target, render_push
from moetool.cli._threads import use_threads

if TYPE_CHECKING:
    from moetool.merge.api import MergeResult

EXAMPLES = """
Examples:

  moetool merge examples/tiny-moe -o tiny-4x --num-experts 4 -d examples/data/train.jsonl

  moetool merge ./mixtral -o ./mixtral-4x --num-experts 4 --method merge-frequency -d calib.jsonl --refit-router

  moetool merge ./mixtral -o ./mistral-dense --to-dense -d calib.jsonl --dense-strategy concat --intermediate-size 1024

  moetool merge ./model -o out --num-experts 4 --method frequency --stats routing/routing-stats.json
"""

MethodOpt = Annotated[
    str | None,
    typer.Option(
        "--method",
        "-m",
        help="How to choose the experts: pruning by frequency, soft-frequency (mean router probability), reap "
        "(router weight x expert output norm) or search (the set of M whose layer output is closest to the "
        "original's, exhaustive when feasible); merging groups around the most used experts (merge-frequency), by "
        "router-row similarity (merge-router) or by expert-output similarity (merge-output), averaged by frequency "
        "after neuron alignment. Default: search with --dataset (frequency with --stats, or where search cannot model "
        "the routing).",
        show_default=False,
    ),
]


@contextmanager
def _progress(enabled: bool) -> Iterator[Callable[[str, int, int | None], None]]:
    """One bar per stage (calibrating / writing / evaluating) on stderr, drawn only for a person watching."""
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,.0f}"),
        TimeElapsedColumn(),
        console=stderr(),
        transient=True,
        disable=not enabled,
    )
    tasks: dict[str, int] = {}

    def advance(stage: str, amount: int, total: int | None) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(stage, total=total)
        bar.advance(tasks[stage], amount)

    with bar:
        yield advance


@handle_errors
def merge_cmd(
    model: options.ModelArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="The output folder (new, or empty; see --overwrite).")],
    num_experts: Annotated[
        int | None,
        typer.Option("--num-experts", "-n", min=1, help="Keep M experts per MoE layer (1 <= M < N)."),
    ] = None,
    to_dense: Annotated[
        bool,
        typer.Option(
            "--to-dense", help="Aggregate each layer's experts into one FFN and write the dense architecture."
        ),
    ] = False,
    method: MethodOpt = None,
    dense_strategy: Annotated[
        str,
        typer.Option(
            "--dense-strategy",
            help="--to-dense: top1 (the most used expert), average (frequency-weighted after neuron alignment) or "
            "concat (experts side by side, scaled by their mean routing weight).",
        ),
    ] = "concat",
    intermediate_size: Annotated[
        int | None,
        typer.Option(
            "--intermediate-size",
            min=1,
            help="--dense-strategy concat: neurons kept from the experts (default: top-k experts' worth).",
        ),
    ] = None,
    refit_router: Annotated[
        bool,
        typer.Option(
            "--refit-router", help="Fit the new router rows to the old routing on calibration tokens (needs --dataset)."
        ),
    ] = False,
    refit_down: Annotated[
        bool | None,
        typer.Option(
            "--refit-down/--no-refit-down",
            help="--to-dense: refit the dense FFN's down projection by least squares to the experts' output on "
            "calibration tokens (default: on with --dataset).",
            show_default=False,
        ),
    ] = None,
    align: Annotated[
        str,
        typer.Option(
            "--align",
            help="How neurons are matched before experts are averaged: weights (their gate/up/down weights), "
            "activations (their activations on calibration tokens) or none.",
        ),
    ] = "weights",
    dataset: Annotated[
        str | None,
        typer.Option(
            "--dataset",
            "-d",
            help="Calibration text (as for profile-routing: .txt, .jsonl, .json, .csv, .parquet, a folder, or a Hub "
            "dataset). The documents calibration does not read are used for the before/after evaluation.",
            show_default=False,
        ),
    ] = None,
    stats: Annotated[
        Path | None,
        typer.Option(
            "--stats",
            help="A routing-stats.json from `moetool profile-routing --out` instead of --dataset (frequency, "
            "soft-frequency, merge-frequency, merge-router).",
            show_default=False,
        ),
    ] = None,
    text_field: options.TextFieldOpt = "text",
    split: options.SplitOpt = "train",
    data_files: options.DataFilesOpt = None,
    dataset_config: options.DatasetConfigOpt = None,
    max_tokens: options.MaxTokensOpt = 50_000,
    seq_len: options.SeqLenOpt = 256,
    batch_size: options.BatchSizeOpt = 8,
    sample_tokens: Annotated[
        int,
        typer.Option(
            "--sample-tokens",
            min=16,
            help="Calibration tokens kept per layer for REAP, output similarity, router refitting and shared gates.",
        ),
    ] = 8192,
    seed: Annotated[int, typer.Option("--seed", help="Seeds the calibration token sample.")] = 0,
    eval_dataset: Annotated[
        str | None,
        typer.Option(
            "--eval-dataset",
            help="Held-out text for perplexity before/after and top-1 agreement (default: what --dataset calibration "
            "did not read).",
            show_default=False,
        ),
    ] = None,
    eval_max_tokens: Annotated[
        int, typer.Option("--eval-max-tokens", min=0, help="Evaluation tokens (0: all of the held-out text).")
    ] = 20_000,
    no_eval: Annotated[bool, typer.Option("--no-eval", help="Skip the before/after evaluation.")] = False,
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Bound on each output shard.")] = "5GB",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.")] = False,
    allow_nonfinite: options.AllowNonfiniteOpt = False,
    device: options.DeviceOpt = "auto",
    dtype: options.DtypeOpt = "auto",
    whole_model: options.WholeModelOpt = False,
    threads: options.ThreadsOpt = 0,
    revision: options.RevisionOpt = None,
    token: options.TokenOpt = None,
    offline: options.OfflineOpt = False,
    push_to_hub: options.PushToHubOpt = None,
    private: options.PrivateOpt = False,
    create_pr: options.CreatePrOpt = False,
    json_output: options.JsonOpt = False,
) -> None:
    """Reduce every MoE layer from N to M experts (--num-experts), or to one dense FFN (--to-dense).

    Calibrates on --dataset (one pass through the model) or reads a profile-routing --stats file, then streams the checkpoint layer by layer. The output really has M experts (config, router rows, correction biases, top-k, DeepSeek groups), in the layout the family's checkpoints use; with --dataset it reports perplexity before and after on the text calibration did not read.
    """  # noqa: E501
    from moetool.data import load_documents
    from moetool.io.source import parse_model_ref
    from moetool.io.writer import check_output_path, parse_size
    from moetool.merge.api import _check_options, merge
    from moetool.modeling import check_device_map, check_device_name, check_dtype_name
    from moetool.validate import preflight

    # Cheap checks first: a typo should not cost a model load or a dataset read.
    check_device_name(device)
    check_dtype_name(dtype)
    check_device_map("none")
    shard_size = parse_size(max_shard_size)
    _check_options(
        num_experts=num_experts,
        to_dense=to_dense,
        method=method,
        dense_strategy=dense_strategy,
        intermediate_size=intermediate_size,
        have_data=dataset is not None,
        have_stats=stats is not None,
        refit_router=refit_router,
        refit_down=refit_down,
        align=align,
    )
    local = parse_model_ref(model, revision=revision).local_path
    check_output_path(out, [local] if local is not None else [], overwrite=overwrite)
    preflight(model, revision=revision, token=token, offline=offline or None, float_weights=True)
    hub = push_target(push_to_hub, private=private, create_pr=create_pr, token=token, offline=offline)

    def read(spec: str):
        return load_documents(
            spec, text_field=text_field, split=split, data_files=data_files, config_name=dataset_config
        )

    calibration = read(dataset) if dataset is not None else None
    eval_documents = read(eval_dataset) if eval_dataset is not None else None
    threads_used = use_threads(threads, json_output=json_output)
    with _progress(progress_enabled(json_output)) as advance:
        result = merge(
            model,
            out,
            num_experts=num_experts,
            to_dense=to_dense,
            method=method,
            dense_strategy=dense_strategy,
            intermediate_size=intermediate_size,
            calibration=calibration,
            calibration_name=dataset or "",
            stats=stats,
            refit_router=refit_router,
            refit_down=refit_down,
            align=align,
            max_tokens=max_tokens or None,
            seq_len=seq_len,
            batch_size=batch_size,
            sample_tokens=sample_tokens,
            seed=seed,
            evaluate=not no_eval,
            eval_documents=eval_documents,
            eval_name=eval_dataset or "",
            eval_max_tokens=eval_max_tokens or None,
            device=device,
            dtype=dtype,
            whole_model=whole_model,
            revision=revision,
            token=token,
            offline=offline or None,
            max_shard_size=shard_size,
            overwrite=overwrite,
            allow_nonfinite=allow_nonfinite,
            command=["moetool", *sys.argv[1:]],
            progress=advance,
        )
    pushed = push_output(hub, out, command="merge", json_output=json_output)
    for message in result.warnings:
        warn(message)
    if json_output:
        print_json(add_push({**result.to_json(), "threads": threads_used}, pushed))
        return
    render(result)
    render_push(pushed)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def render(result: MergeResult) -> None:
    """The human report: what was done, per-layer table, sizes, evaluation."""
    from moetool.merge.api import describe_layer

    console = stdout()
    if result.mode == "dense":
        what = (
            f"{result.num_experts_before} experts -> dense {result.output_model_type} FFN of "
            f"{result.intermediate_size} (strategy {result.dense_strategy})"
        )
    else:
        what = (
            f"{result.num_experts_before} -> {result.num_experts_after} experts, top-{result.top_k_before} -> "
            f"top-{result.top_k_after}, method {result.method}" + (", router refitted" if result.refit_router else "")
        )
    console.print(f"[bold]{escape(result.model)}[/bold] ({result.family}) -> {escape(result.output)}", highlight=False)
    console.print(f"  {what}", highlight=False)
    table = Table(show_edge=False, title="Per MoE layer (output expert ← source experts)", title_justify="left")
    table.add_column("layer", justify="right")
    table.add_column("experts")
    table.add_column("dropped")
    table.add_column("notes")
    for decision in result.layers:
        notes = []
        refit = decision.notes.get("router_refit")
        if refit:
            notes.append(f"router CE {refit['loss_before']:.4f} -> {refit['loss_after']:.4f}")
        if "shared_expert_gate_mean" in decision.notes:
            notes.append(f"shared gate mean {decision.notes['shared_expert_gate_mean']:.3f}")
        table.add_row(
            str(decision.layer),
            describe_layer(decision, result.mode),
            ", ".join(map(str, decision.dropped)) or "-",
            "; ".join(notes),
        )
    console.print(table)
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="dim")
    summary.add_column(justify="right", style="bold")
    summary.add_column()
    summary.add_row(
        "parameters",
        human_count(result.output_params),
        f"from {human_count(result.source_params)} ({100 * result.output_params / max(result.source_params, 1):.1f}%)",
    )
    summary.add_row("weights on disk", human_bytes(result.written_bytes), f"from {human_bytes(result.source_bytes)}")
    summary.add_row(
        "calibration", f"{result.calibration.get('tokens', 0):,}", f"tokens ({result.calibration.get('source')})"
    )
    if result.eval is not None:
        summary.add_row("perplexity before", f"{result.eval.perplexity_before:.3f}", escape(result.eval.dataset))
        summary.add_row("perplexity after", f"{result.eval.perplexity_after:.3f}", f"{result.eval.tokens:,} tokens")
        summary.add_row("top-1 agreement", _pct(result.eval.top1_agreement), "same next token as the source")
        summary.add_row("KL(source ‖ output)", f"{result.eval.kl:.4g}", "nats per token")
    for note in result.adjustments:
        summary.add_row("adjusted", "", escape(note))
    console.print(summary)
