"""``moetool export``: a moetool-format quantized checkpoint rewritten in compressed-tensors (same codes)."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated

import typer

from moetool.cli import options
from moetool.cli._errors import handle_errors
from moetool.cli._output import human_bytes, print_json, stdout
from moetool.cli._progress import progress_display, progress_enabled
from moetool.cli._push import add_push, push_output, push_target, render_push

if TYPE_CHECKING:
    from moetool.quantize.export import ExportResult

EXAMPLES = """
Examples:

  moetool export ./my-moe-w4-moetool -o ./my-moe-w4-ct

  moetool export ./my-moe-w4-moetool -o ./my-moe-w4-ct --json

  moetool export ./my-moe-w4-moetool -o ./my-moe-w4-ct --push-to-hub me/my-moe-w4-ct
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
    push_to_hub: options.PushToHubOpt = None,
    private: options.PrivateOpt = False,
    create_pr: options.CreatePrOpt = False,
    json_output: options.JsonOpt = False,
) -> None:
    """Rewrite a checkpoint quantized in moetool's format as compressed-tensors, which vLLM and SGLang serve.

    The codes and scales are kept exactly (nothing is re-quantized). Only codes the servers' MoE kernels take
    convert: symmetric (quantized with --sym), 4 or 8 bits, groups of equal size; anything else is refused with
    the reason.
    """
    from moetool.io.sizes import parse_size
    from moetool.quantize.export import export

    shard_size = parse_size(max_shard_size)
    hub = push_target(push_to_hub, private=private, create_pr=create_pr, token=token, offline=offline)
    with progress_display(enabled=progress_enabled(json_output)) as progress:
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
            max_shard_size=shard_size,
            progress=progress,
        )
    pushed = push_output(hub, out, command="export", json_output=json_output)
    if json_output:
        print_json(add_push(result.to_json(), pushed))
        return
    render(result)
    render_push(pushed)


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
