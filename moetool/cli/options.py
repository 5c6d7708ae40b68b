"""Option declarations shared by every command (one place, one spelling)."""

from __future__ import annotations

from typing import Annotated

import typer

ModelArg = Annotated[
    str,
    typer.Argument(help="A local checkpoint folder, or a Hugging Face Hub repo id (org/name).", show_default=False),
]
RevisionOpt = Annotated[
    str | None,
    typer.Option("--revision", help="Hub branch, tag or commit (recorded as the full commit sha)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document (stable, versioned schema) on stdout.")]
TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token",
        help="Hub token (default: HF_TOKEN or the one saved by `hf auth login`).",
        show_default=False,
    ),
]
OfflineOpt = Annotated[bool, typer.Option("--offline", help="Never touch the network (same as HF_HUB_OFFLINE=1).")]
