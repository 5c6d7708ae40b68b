"""``moetool eval``: perplexity on a dataset, and KL / top-1 agreement against a reference model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from moetool.cli import options
from moetool.cli._errors import handle_errors
from moetool.cli._output import print_json, stdout
from moetool.cli._progress import progress_enabled, status, token_progress
from moetool.cli._threads import use_threads

if TYPE_CHECKING:
    from moetool.evaluate import EvalResult

EXAMPLES = """
Examples:

  moetool eval ./my-moe --dataset held-out.jsonl

  moetool eval ./merged --dataset corpus/ --reference ./original --json

  moetool eval org/model --dataset Salesforce/wikitext --dataset-config wikitext-2-raw-v1 --split test

  moetool eval ./my-moe -d mixed.jsonl --domain-field source --max-tokens 0
"""

ReferenceOpt = Annotated[
    str | None,
    typer.Option(
        "--reference",
        help="A second model (same tokenizer) run on the same tokens: adds KL(reference || MODEL) and top-1 "
        "next-token agreement.",
        show_default=False,
    ),
]
ReferenceRevisionOpt = Annotated[
    str | None, typer.Option("--reference-revision", help="Hub branch, tag or commit of --reference.")
]


@handle_errors
def eval_model(
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
    reference: ReferenceOpt = None,
    device: options.DeviceOpt = "auto",
    dtype: options.DtypeOpt = "auto",
    device_map: options.DeviceMapOpt = "none",
    whole_model: options.WholeModelOpt = False,
    offload_activations: options.OffloadActivationsOpt = False,
    threads: options.ThreadsOpt = 0,
    revision: options.RevisionOpt = None,
    reference_revision: ReferenceRevisionOpt = None,
    token: options.TokenOpt = None,
    offline: options.OfflineOpt = False,
    json_output: options.JsonOpt = False,
) -> None:
    """Perplexity of MODEL on a dataset; with --reference, KL divergence and top-1 agreement too.

    Documents are packed into windows of --seq-len tokens, one domain at a time; every token after a window's first is
    scored. The dataset is checked before any model is loaded. Models run one decoder layer at a time (memory: one
    layer plus the activations, whatever the model size), logits one batch at a time.
    """
    from moetool.data import load_documents
    from moetool.modeling import check_device_map, check_device_name, check_dtype_name
    from moetool.validate import preflight

    # Cheap checks first (no torch): a typo should not cost a model load.
    check_device_name(device)
    check_dtype_name(dtype)
    check_device_map(device_map)
    # The models' configs and headers too (no weights read): a malformed one costs no dataset read.
    preflight(model, revision=revision, token=token, offline=offline or None)
    if reference is not None:
        preflight(reference, revision=reference_revision, token=token, offline=offline or None)
    documents = load_documents(
        dataset,
        text_field=text_field,
        domain_field=domain_field,
        split=split,
        data_files=data_files,
        config_name=dataset_config,
    )

    from moetool.cli._runner import memory_plan
    from moetool.evaluate import check_seq_len, evaluate
    from moetool.modeling import check_same_tokenizer, load_tokenizer, open_checkpoint
    from moetool.runner.open import open_runner

    show = progress_enabled(json_output)
    offline_flag = offline or None
    threads_used = use_threads(threads, json_output=json_output)
    with status(f"opening {model}", enabled=show):
        checkpoint = open_checkpoint(model, revision=revision, token=token, offline=offline_flag)
        check_seq_len(checkpoint.config, seq_len, model)
        tokenizer = load_tokenizer(checkpoint)
        ref_checkpoint = ref_tokenizer = None
        if reference is not None:
            ref_checkpoint = open_checkpoint(reference, revision=reference_revision, token=token, offline=offline_flag)
            check_seq_len(ref_checkpoint.config, seq_len, reference)
            ref_tokenizer = load_tokenizer(ref_checkpoint)
            # Before any weights are read: two tokenizers that differ make every figure meaningless.
            check_same_tokenizer(tokenizer, ref_tokenizer, names=(model, reference))
    run_options = {
        "device": device,
        "dtype": dtype,
        "whole_model": whole_model,
        "device_map": device_map,
        "hidden": "cpu" if offload_activations else "auto",
        "tokenizer": False,
        "pass_tokens": batch_size * seq_len,
    }
    with status(f"loading {model}", enabled=show):
        opened = open_runner(checkpoint, **run_options)
    memory = memory_plan(opened, tokens=(max_tokens or batch_size * seq_len), enabled=show)
    ref_runner = None
    if ref_checkpoint is not None:
        with status(f"loading {reference}", enabled=show):
            ref_runner = open_runner(ref_checkpoint, **run_options).runner

    limit = max_tokens or None
    with token_progress("evaluating", limit, enabled=show) as advance:
        result = evaluate(
            opened.runner,
            tokenizer,
            documents,
            seq_len=seq_len,
            batch_size=batch_size,
            max_tokens=limit,
            reference_model=ref_runner,
            progress=advance,
            model_name=model,
            reference_name=reference,
        )
    result.revision = checkpoint.revision
    from moetool.runner.dist import current_ranks

    if not current_ranks(device).is_main:
        return  # every process has the summed figures; the first one reports them
    if ref_checkpoint is not None:
        result.reference_revision = ref_checkpoint.revision
    if json_output:
        doc = result.to_json()
        doc["memory"] = memory
        doc["threads"] = threads_used
        print_json(doc)
        return
    render(result)


def _float(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def render(result: EvalResult) -> None:
    """Print the human-readable result on stdout."""
    console = stdout()
    console.print(
        f"[bold]{escape(result.model)}[/bold]  ({result.windows:,} windows of up to {result.seq_len} tokens)",
        highlight=False,
    )
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="dim")
    summary.add_column(justify="right", style="bold")
    summary.add_column()
    summary.add_row("perplexity", _float(result.perplexity, ".4f"), "")
    summary.add_row("NLL", _float(result.nll, ".5f"), "nats per token")
    summary.add_row("tokens scored", f"{result.tokens:,}", f"of {result.input_tokens:,} read")
    if result.reference is not None:
        summary.add_row("reference", "", Text(result.reference))
        summary.add_row("KL(ref ‖ model)", _float(result.kl, ".6f"), "nats per token")
        summary.add_row(
            "top-1 agreement",
            "-" if result.top1_agreement is None else f"{100 * result.top1_agreement:.2f}%",
            "same most likely next token",
        )
    console.print(summary)
    if result.per_domain:
        table = Table(title="Per domain", title_justify="left", show_edge=False)
        table.add_column("domain")
        table.add_column("tokens", justify="right")
        table.add_column("perplexity", justify="right")
        if result.reference is not None:
            table.add_column("KL", justify="right")
            table.add_column("top-1", justify="right")
        for domain, figures in result.per_domain.items():
            row: list[str | Text] = [Text(domain), f"{figures['tokens']:,}", _float(figures["perplexity"], ".4f")]
            if result.reference is not None:
                row += [_float(figures["kl"], ".6f"), f"{100 * figures['top1_agreement']:.2f}%"]
            table.add_row(*row)
        console.print(table)
