"""``moetool export``: a moetool-format quantized checkpoint rewritten in compressed-tensors (same codes)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated

import typer

from moetool.cli import options
from moetool.cli._errors import handle_errors
from moetool.cli._output import human_bytes, print_json, stdout
from moetool.cli._progress import note_printer, progress_enabled

if TYPE_CHECKING:
    from moetool.quantize.export import ExportResult

EXAMPLES = """
Examples:

  moetool export ./my-moe-w4-moetool -o ./my-moe-w4-ct

  moetool export ./my-moe-w4-moetool -o ./my-moe-w4-ct --json
"""


@handle_errors
def export_cmd(
    model: options.ModelArg,
    out: Annotated[
        str,
        typer.Option("--out", "-o", help="The new model folder (must not exist, or --overwrite).", show_default=False),
    ],
    to: Annotated[str, typer.Option("--to", help="The target format.")] = "compressed-tensors",
    verify: Annotated[
        bool,
        typer.Option(
            "--verify/--no-verify",
            help="Decompress with the compressed-tensors library, and reload small models, before publishing.",
        ),
    ] = True,
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Largest weight file, e.g. 5GB.")] = "5GB",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.")] = False,
    revision: options.RevisionOpt = None,
    token: options.TokenOpt = None,
    offline: options.OfflineOpt = False,
    json_output: options.JsonOpt = False,
) -> None:
    """Rewrite a checkpoint quantized in moetool's format as compressed-tensors, which vLLM and SGLang serve.

    The codes and scales are kept exactly (nothing is re-quantized). Only codes the servers' MoE kernels take
    convert: symmetric (quantized with --sym), 4 or 8 bits, groups of equal size; anything else is refused with
    the reason.
    """
    from moetool.io.writer import parse_size
    from moetool.quantize.export import export

    parse_size(max_shard_size)
    result = export(
        model,
        out,
        to=to,
        verify=verify,
        overwrite=overwrite,
        revision=revision,
        token=token,
        offline=offline or None,
        command=["moetool", *sys.argv[1:]],
        max_shard_size=max_shard_size,
        on_status=note_printer(enabled=progress_enabled(json_output)),
    )
    if json_output:
        print_json(result.to_json())
        return
    render(result)


def render(result: ExportResult) -> None:
    """Print what was written and checked."""
    console = stdout()
    fmt = result.format
    console.print(
        f"[bold]{result.source}[/bold] ({result.family}) -> {result.output}  [dim]{fmt.storage}, {fmt.label}[/dim]",
        highlight=False,
    )
    routed = result.storage.get("routed_experts")
    if routed is not None and routed.bits_per_param is not None:
        console.print(f"  routed experts  {routed.bits_per_param:.3f} bits per parameter on disk", highlight=False)
    if result.verification is not None:
        for check in result.verification.checks:
            verdict = {True: "[green]ok[/green]", False: "[red]FAILED[/red]", None: "[yellow]skipped[/yellow]"}[
                check.passed
            ]
            console.print(f"  check {check.name:<18} {verdict}  [dim]{check.detail}[/dim]", highlight=False)
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items())
    console.print(f"[dim]{human_bytes(result.bytes_written)} written; {timings}[/dim]", highlight=False)
