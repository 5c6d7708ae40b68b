"""``moetool quantize``: low-bit routed experts (GPTQ, round-to-nearest, NF4, ternary), verified on disk."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from moetool.cli import options
from moetool.cli._errors import handle_errors
from moetool.cli._output import human_bytes, print_json, stdout, warn
from moetool.cli._progress import progress_display, progress_enabled
from moetool.cli._push import add_push, push_output, push_target, render_push
from moetool.cli._threads import use_threads

if TYPE_CHECKING:
    from moetool.quantize import QuantizeResult

EXAMPLES = """
Examples:

  moetool quantize ./my-moe -o ./my-moe-w4 --bits 4 --dataset calib.jsonl

  moetool quantize ./my-moe -o ./my-moe-w4-ct --bits 4 --group-size 128 -d calib.jsonl --format compressed-tensors

  moetool quantize ./my-moe -o ./my-moe-w3 --bits 3 --group-size 64 -d calib.jsonl --calib-all-experts

  moetool quantize ./my-moe -o ./my-moe-ternary --ternary -d calib.jsonl

  moetool quantize ./my-moe -o ./my-moe-rtn4 --bits 4 --method rtn

  moetool quantize ./my-moe -o ./my-moe-nf4 --method nf4 --group-size 64
"""

# The size of the per-expert coverage table: larger models get a per-layer summary unless --all.
_COVERAGE_ROWS = 64


@handle_errors
def quantize_cmd(
    model: options.ModelArg,
    out: Annotated[
        str,
        typer.Option("--out", "-o", help="The new model folder (must not exist, or --overwrite).", show_default=False),
    ],
    bits: Annotated[
        int | None,
        typer.Option(
            "--bits",
            "-b",
            help="Bits per expert weight: 8, 4, 3 or 2 (default 4; nf4 is always 4).",
            show_default=False,
        ),
    ] = None,
    ternary: Annotated[
        bool,
        typer.Option(
            "--ternary", help="Codes -1/0/+1 with a scale per group, entropy coded (QMoE-style, < 1 bit on disk)."
        ),
    ] = False,
    method: Annotated[
        str,
        typer.Option(
            "--method",
            "-m",
            help="gptq (needs --dataset), rtn (round to nearest), nf4 (bitsandbytes' 4-bit codes) or fp4 (E2M1 "
            "4-bit floats, MXFP4/NVFP4's elements, with a float16 scale per group).",
        ),
    ] = "gptq",
    group_size: Annotated[
        int,
        typer.Option(
            "--group-size",
            "-g",
            help="Input columns per scale; 0 for one scale per row. A last, shorter group is allowed.",
        ),
    ] = 128,
    act_order: Annotated[
        bool, typer.Option("--act-order/--no-act-order", help="GPTQ: quantize columns by decreasing Hessian diagonal.")
    ] = True,
    damp: Annotated[
        float, typer.Option("--damp", help="GPTQ dampening, a fraction of the mean Hessian diagonal.")
    ] = 0.01,
    clip_search: Annotated[
        bool,
        typer.Option("--clip-search", help="Uniform codes: search a shrunken range per group (helps at 2-3 bits)."),
    ] = False,
    ternary_scale: Annotated[
        float,
        typer.Option(
            "--ternary-scale",
            help="Ternary: the scale as a fraction of the group's absmax (smaller: more accurate, larger).",
        ),
    ] = 1.0,
    ternary_bits: Annotated[
        float,
        typer.Option(
            "--ternary-bits",
            help="Ternary: bits per expert parameter on disk to stay under; each expert's scale grows until its "
            "codes fit (0: off, use --ternary-scale).",
        ),
    ] = 1.0,
    output_format: Annotated[
        str,
        typer.Option(
            "--format",
            help="auto (compressed-tensors, what vLLM/SGLang/transformers read, when the settings fit: 4 or 8 bits, "
            "symmetric, groups of 32/64/128 or per row; else moetool's own), compressed-tensors or moetool.",
        ),
    ] = "auto",
    symmetric: Annotated[
        bool | None,
        typer.Option(
            "--sym/--asym",
            help="Uniform codes symmetric around 0 (no zero point) or asymmetric (default: symmetric in "
            "compressed-tensors, asymmetric in moetool's format).",
            show_default=False,
        ),
    ] = None,
    quantize_attention: Annotated[
        bool, typer.Option("--quantize-attention", help="Quantize the attention projections too.")
    ] = False,
    quantize_shared_experts: Annotated[
        bool,
        typer.Option("--quantize-shared-experts", help="Quantize the shared experts too (families that have them)."),
    ] = False,
    dataset: Annotated[
        str | None,
        typer.Option("--dataset", "-d", help="Calibration text for GPTQ (file, folder or Hub dataset id)."),
    ] = None,
    text_field: options.TextFieldOpt = "text",
    split: options.SplitOpt = "train",
    data_files: options.DataFilesOpt = None,
    dataset_config: options.DatasetConfigOpt = None,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", min=0, help="Calibration tokens to read (0: all of the dataset).")
    ] = 65536,
    seq_len: Annotated[
        int, typer.Option("--seq-len", min=2, help="Tokens per calibration window (cut to the model's maximum).")
    ] = 512,
    batch_size: options.BatchSizeOpt = 8,
    calib_all_experts: Annotated[
        bool,
        typer.Option(
            "--calib-all-experts",
            help="Give every expert every calibration token (the output still uses the real routing).",
        ),
    ] = False,
    max_tokens_per_expert: Annotated[
        int,
        typer.Option("--max-tokens-per-expert", min=0, help="Cap the tokens a hot expert calibrates on (0: no cap)."),
    ] = 0,
    min_tokens_per_expert: Annotated[
        int,
        typer.Option("--min-tokens-per-expert", min=0, help="Experts routed fewer tokens than this use --fallback."),
    ] = 64,
    fallback: Annotated[
        str,
        typer.Option(
            "--fallback", help="For rarely routed experts: all-tokens (the layer's all-token Hessian) or rtn."
        ),
    ] = "all-tokens",
    expert_batch: Annotated[
        int,
        typer.Option(
            "--expert-batch", min=0, help="Experts quantized together (0: a whole layer; less bounds GPU memory)."
        ),
    ] = 0,
    device: options.DeviceOpt = "auto",
    threads: options.ThreadsOpt = 0,
    dtype: Annotated[
        str,
        typer.Option(
            "--dtype",
            help="Compute dtype for calibration: auto (float32 on CPU, the checkpoint's on GPU), bfloat16, ...",
        ),
    ] = "auto",
    whole_model: options.WholeModelOpt = False,
    offload_activations: options.OffloadActivationsOpt = False,
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Largest weight file, e.g. 5GB.")] = "5GB",
    verify: Annotated[
        bool,
        typer.Option(
            "--verify/--no-verify",
            help="Decode the written codes, and reload small models with transformers, before publishing.",
        ),
    ] = True,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.")] = False,
    allow_nonfinite: options.AllowNonfiniteOpt = False,
    show_all: Annotated[bool, typer.Option("--all", help="Show every expert in the coverage table.")] = False,
    revision: options.RevisionOpt = None,
    token: options.TokenOpt = None,
    offline: options.OfflineOpt = False,
    push_to_hub: options.PushToHubOpt = None,
    private: options.PrivateOpt = False,
    create_pr: options.CreatePrOpt = False,
    json_output: options.JsonOpt = False,
) -> None:
    """Quantize every routed expert of an MoE checkpoint; router, norms, embeddings and lm_head stay as they are.

    The model is streamed: each decoder layer is read once, calibrated, quantized, written and freed before the
    next, so memory holds one layer plus the calibration activations, whatever the model size. GPTQ calibrates each
    expert on the tokens the model routes to it (all experts of a layer in one batched step); the output is checked
    (100% of routed-expert parameters quantized, codes decoded back layer by layer, original vs quantized logits on a
    probe window, reload with transformers for small models) before it is published, and the bits per parameter are
    measured from the files. Settings servers can run are written in the compressed-tensors format (vLLM, SGLang,
    transformers load it); the rest (2/3-bit, asymmetric, NF4, ternary) in moetool's own, which loads with
    moetool.load_model.
    """
    from moetool.errors import UsageError
    from moetool.validate import preflight

    if ternary and bits is not None:
        raise UsageError("--bits and --ternary exclude each other", hint="ternary codes are -1/0/+1")
    # Before torch is imported (below): a malformed input is refused in a fraction of a second.
    preflight(model, revision=revision, token=token, offline=offline or None, float_weights=True)
    from moetool.io.sizes import parse_size
    from moetool.quantize import CoverageOptions, QuantizeOptions, quantize

    opts = QuantizeOptions(
        bits=bits,
        ternary=ternary,
        method=method,
        group_size=group_size,
        act_order=act_order,
        damp=damp,
        clip_search=clip_search,
        ternary_scale=ternary_scale,
        ternary_bits=ternary_bits,
        attention=quantize_attention,
        shared_experts=quantize_shared_experts,
        coverage=CoverageOptions(
            all_experts=calib_all_experts,
            max_tokens_per_expert=max_tokens_per_expert,
            min_tokens_per_expert=min_tokens_per_expert,
            fallback=fallback,
        ),
        expert_batch=expert_batch,
        device=device,
        dtype=dtype,
        max_shard_size=parse_size(max_shard_size),
        whole_model=whole_model,
        offload_activations=offload_activations,
        output_format=output_format,
        symmetric=symmetric,
    )
    hub = push_target(push_to_hub, private=private, create_pr=create_pr, token=token, offline=offline)
    calibration = None
    if dataset is not None:
        calibration = options.dataset_spec(
            dataset,
            text_field=text_field,
            split=split,
            data_files=data_files,
            dataset_config=dataset_config,
            max_tokens=max_tokens,
            seq_len=seq_len,
            batch_size=batch_size,
        )
    show = progress_enabled(json_output)
    threads_used = use_threads(threads, json_output=json_output)

    with progress_display(enabled=show) as progress:
        result = quantize(
            model,
            out,
            opts,
            calibration=calibration,
            verify=verify,
            overwrite=overwrite,
            allow_nonfinite=allow_nonfinite,
            revision=revision,
            token=token,
            offline=offline or None,
            command=["moetool", *sys.argv[1:]],
            progress=progress,
        )
    from moetool.runner.dist import current_ranks

    if not current_ranks(device).is_main:
        return  # the first process wrote, checked and reports the output
    pushed = push_output(hub, out, command="quantize", json_output=json_output)
    if json_output:
        print_json(add_push({**result.to_json(), "threads": threads_used}, pushed))
        return
    for message in result.warnings:
        warn(message)
    render(result, show_all=show_all)
    render_push(pushed)


def _bits(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def render(result: QuantizeResult, *, show_all: bool = False) -> None:
    """Print what was written: bits per parameter by category, coverage, checks, timings."""
    console = stdout()
    fmt = result.format
    console.print(
        f"[bold]{result.source}[/bold] ({result.family}) -> {result.output}  [dim]{fmt.label}, "
        f"{', '.join(fmt.categories)}, on {result.device}[/dim]",
        highlight=False,
    )
    console.print(f"format {fmt.storage}  [dim]{result.format_reason}[/dim]", highlight=False)
    table = Table(title="Bits per parameter (bytes on disk)", title_justify="left", show_edge=False)
    table.add_column("category")
    table.add_column("parameters", justify="right")
    table.add_column("quantized", justify="right")
    table.add_column("bytes", justify="right")
    table.add_column("bits/param", justify="right")
    for category, entry in result.storage.items():
        share = f"{100 * entry.quantized_params / entry.params:.0f}%" if entry.params else "-"
        style = "bold" if category in ("routed_experts", "total") else None
        table.add_row(
            category, f"{entry.params:,}", share, human_bytes(entry.bytes), _bits(entry.bits_per_param), style=style
        )
    console.print(table)

    layers = [layer for layer in result.layers if layer.coverage is not None]
    if layers:
        per_expert = show_all or sum(len(layer.coverage.experts) for layer in layers) <= _COVERAGE_ROWS
        cov = Table(title="Calibration coverage (tokens per expert)", title_justify="left", show_edge=False)
        cov.add_column("layer", justify="right")
        if per_expert:
            cov.add_column("expert", justify="right")
            cov.add_column("routed", justify="right")
            cov.add_column("used", justify="right")
            cov.add_column("Hessian")
            for layer in layers:
                for expert in layer.coverage.experts:
                    style = "yellow" if expert.hessian != "routed" else None
                    cov.add_row(
                        str(layer.layer),
                        str(expert.expert),
                        f"{expert.routed:,}",
                        f"{expert.used:,}",
                        expert.hessian,
                        style=style,
                    )
        else:
            cov.add_column("tokens", justify="right")
            cov.add_column("min routed", justify="right")
            cov.add_column("max routed", justify="right")
            cov.add_column("fallbacks", justify="right")
            for layer in layers:
                routed = [e.routed for e in layer.coverage.experts]
                fallbacks = sum(1 for e in layer.coverage.experts if e.hessian != "routed")
                cov.add_row(
                    str(layer.layer),
                    f"{layer.coverage.tokens:,}",
                    f"{min(routed):,}",
                    f"{max(routed):,}",
                    str(fallbacks),
                )
        console.print(cov)
        errors = Table(
            title="GPTQ vs round-to-nearest: output error on the calibration inputs",
            title_justify="left",
            show_edge=False,
        )
        errors.add_column("layer", justify="right")
        errors.add_column("weight")
        errors.add_column("GPTQ", justify="right")
        errors.add_column("RTN", justify="right")
        errors.add_column("ratio", justify="right")
        for layer in result.layers:
            for weight, figures in layer.proxy_error.items():
                ratio = figures["gptq"] / figures["rtn"] if figures["rtn"] else float("nan")
                errors.add_row(
                    str(layer.layer), weight, f"{figures['gptq']:.4g}", f"{figures['rtn']:.4g}", f"{ratio:.2f}"
                )
        console.print(errors)

    if result.verification is not None:
        for check in result.verification.checks:
            verdict = {True: "[green]ok[/green]", False: "[red]FAILED[/red]", None: "[yellow]skipped[/yellow]"}[
                check.passed
            ]
            console.print(f"  check {check.name:<18} {verdict}  [dim]{check.detail}[/dim]", highlight=False)
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items())
    console.print(f"[dim]{human_bytes(result.bytes_written)} written; {timings}[/dim]", highlight=False)
