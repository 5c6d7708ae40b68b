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
)

app = typer.Typer(
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
) -> None:
    """Inspect and transform Mixture-of-Experts checkpoints in the Hugging Face format."""


app.command("inspect", epilog=inspect_cmd.EXAMPLES)(inspect_cmd.inspect)
app.command("profile-routing", epilog=profile_cmd.EXAMPLES)(profile_cmd.profile_routing_cmd)
app.command("eval", epilog=eval_cmd.EXAMPLES)(eval_cmd.eval_model)
app.command("upcycle", epilog=upcycle_cmd.EXAMPLES)(upcycle_cmd.upcycle_cmd)
app.command("merge", epilog=merge_cmd.EXAMPLES)(merge_cmd.merge_cmd)
app.command("distill", epilog=distill_cmd.EXAMPLES)(distill_cmd.distill_cmd)
app.command("quantize", epilog=quantize_cmd.EXAMPLES)(quantize_cmd.quantize_cmd)
app.command("export", epilog=export_cmd.EXAMPLES)(export_cmd.export_cmd)


def main() -> None:
    """Console-script entry point."""
    app(prog_name="moetool")
