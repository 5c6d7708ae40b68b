"""``moetool verify``: check an output folder byte for byte against its ``moetool-manifest.json``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from moetool.cli import options
from moetool.cli._errors import handle_errors, report_error
from moetool.cli._output import human_bytes, print_json, stdout
from moetool.cli._progress import progress_enabled, status
from moetool.errors import MoetoolError

if TYPE_CHECKING:
    from moetool.io.manifest import VerifyResult

EXAMPLES = """
Examples:

  moetool verify ./tiny-w4

  moetool verify ~/.cache/huggingface/hub/models--my-org--tiny-w4/snapshots/<sha> --json
"""


class VerifyFailedError(MoetoolError):
    """The folder differs from its manifest, or its model card is invalid (exit code 1)."""

    default_code = "VERIFY_FAILED"


@handle_errors
def verify(
    folder: Annotated[
        Path,
        typer.Argument(
            help="A folder written by moetool (merge, quantize, upcycle, distill, profile-routing --out), or a copy "
            "or download of one.",
            show_default=False,
        ),
    ],
    json_output: options.JsonOpt = False,
) -> None:
    """Check every file of FOLDER against the SHA-256 and size in its moetool-manifest.json.

    Exit 1 when a file changed, is missing, or was added (the Hub's .gitattributes and huggingface_hub's
    .cache/ are not counted), or when the folder's model card has metadata the Hub would reject.
    """
    from moetool.io.manifest import verify_folder
    from moetool.io.model_card import README_NAME, CardError, validate_model_card

    with status(f"hashing {folder}", enabled=progress_enabled(json_output)):
        result = verify_folder(folder)
    card_problem: str | None = None
    card = folder / README_NAME
    if card.is_file():
        try:
            validate_model_card(card)
        except CardError as exc:
            card_problem = exc.message
    if json_output:
        doc = result.to_json()
        doc["card"] = None if not card.is_file() else (card_problem or "ok")
        doc["ok"] = result.ok and card_problem is None
        print_json(doc)
    else:
        render(result, card_problem, has_card=card.is_file())
    if not result.ok or card_problem:
        what = []
        for label, names in (("changed", result.changed), ("missing", result.missing), ("extra", result.extra)):
            if names:
                what.append(f"{len(names)} {label}")
        if card_problem:
            what.append("invalid model card")
        report_error(
            VerifyFailedError(
                f"{folder} does not match its manifest: {', '.join(what)}",
                hint="the output was modified or copied incompletely; rebuild or re-download it",
            )
        )
        raise typer.Exit(VerifyFailedError.exit_code)


def render(result: VerifyResult, card_problem: str | None, *, has_card: bool) -> None:
    """One line per problem, then a summary line."""
    console = stdout()
    for label, names in (("changed", result.changed), ("missing", result.missing), ("extra", result.extra)):
        for name in names:
            console.print(f"[red]{label:<8}[/red] {escape(name)}", highlight=False)
    if card_problem:
        console.print(f"[red]card    [/red] {escape(card_problem)}", highlight=False)
    if result.ok and not card_problem:
        card_note = ", model card ok" if has_card else ""
        console.print(
            f"[green]ok[/green] {escape(result.folder)}: {result.files} files, {human_bytes(result.bytes)} match "
            f"moetool-manifest.json{card_note}",
            highlight=False,
        )
