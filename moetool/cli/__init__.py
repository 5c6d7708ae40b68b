"""The ``moetool`` command line: thin commands over the library.

Each command lives in its own module, parses options, calls library functions and renders. Nothing
on the ``--help`` path imports torch.
"""

from __future__ import annotations

from typing import Annotated

import typer

from moetool import __version__
from moetool.cli import (
    distill_cmd,
    eval_cmd,
    export_cmd,
    inspect_cmd,
    merge_cmd,
    profile_cmd,
    quantize_cmd,
    upcycle_cmd,
    verify_cmd,
)
from moetool.cli._command import MoetoolCommand, MoetoolGroup
from moetool.cli._output import set_quiet

app = typer.Typer(
    cls=MoetoolGroup,
    name="moetool",
    help="Inspect and transform Mixture-of-Experts checkpoints in the Hugging Face format.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"moetool {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    quiet: Annotated[
        bool,
        typer.Option(
            "--quiet",
            "-q",
            help="Print only errors and the --json document: no progress, warnings or summary (before the command: "
            "moetool -q merge ...).",
        ),
    ] = False,
) -> None:
    """Inspect and transform Mixture-of-Experts checkpoints in the Hugging Face format."""
    set_quiet(quiet)


# MoetoolCommand: flags without a "<bool>" label in --help, usage errors as JSON under --json.
app.command("inspect", epilog=inspect_cmd.EXAMPLES, cls=MoetoolCommand)(inspect_cmd.inspect)
app.command("profile-routing", epilog=profile_cmd.EXAMPLES, cls=MoetoolCommand)(profile_cmd.profile_routing_cmd)
app.command("eval", epilog=eval_cmd.EXAMPLES, cls=MoetoolCommand)(eval_cmd.eval_model)
app.command("upcycle", epilog=upcycle_cmd.EXAMPLES, cls=MoetoolCommand)(upcycle_cmd.upcycle_cmd)
app.command("merge", epilog=merge_cmd.EXAMPLES, cls=MoetoolCommand)(merge_cmd.merge_cmd)
app.command("distill", epilog=distill_cmd.EXAMPLES, cls=MoetoolCommand)(distill_cmd.distill_cmd)
app.command("quantize", epilog=quantize_cmd.EXAMPLES, cls=MoetoolCommand)(quantize_cmd.quantize_cmd)
app.command("verify", epilog=verify_cmd.EXAMPLES, cls=MoetoolCommand)(verify_cmd.verify)
app.command("export", epilog=export_cmd.EXAMPLES, cls=MoetoolCommand)(export_cmd.export_cmd)


def main() -> None:
    """Console-script entry point."""
    from moetool.cli._faults import install_fault_handlers

    install_fault_handlers()
    try:
        app(prog_name="moetool")
    finally:
        _close_process_group()


def _close_process_group() -> None:
    """End the communication of a multi-process run (torchrun / accelerate launch) before the interpreter
    exits: a gloo process group left to interpreter shutdown can abort (SIGABRT) in its destructor while
    its threads still run. Single-process runs never import torch.distributed for this."""
    import sys

    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
