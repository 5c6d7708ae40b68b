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
ThreadsOpt = Annotated[
    int,
    typer.Option(
        "--threads",
        min=0,
        help="CPU threads for torch (0: OMP_NUM_THREADS if set, else as many as there are idle cores, at least 1).",
    ),
]

# ----------------------------------------------------------------------------- datasets and running models
# Shared by the commands that run a model on text (eval, profile-routing). Defaults are set where each
# command declares its parameters.

DatasetOpt = Annotated[
    str,
    typer.Option(
        "--dataset",
        "-d",
        help="Text to run: a .txt (one document per paragraph), .jsonl, .json, .csv, .tsv or .parquet file, "
        "a folder of them (read recursively), or a Hub dataset id (needs `pip install datasets`).",
        show_default=False,
    ),
]
TextFieldOpt = Annotated[str, typer.Option("--text-field", help="The field (column) that holds the text.")]
DomainFieldOpt = Annotated[
    str | None,
    typer.Option("--domain-field", help="A field naming each document's domain: figures are also given per domain."),
]
SplitOpt = Annotated[str, typer.Option("--split", help="The split of a Hub dataset.")]
DataFilesOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--data-files",
        help="Files to read: glob patterns inside a local dataset folder, or data_files for a Hub dataset "
        "(repeatable).",
        show_default=False,
    ),
]
DatasetConfigOpt = Annotated[
    str | None,
    typer.Option(
        "--dataset-config", help="The configuration of a Hub dataset that has several (e.g. wikitext-2-raw-v1)."
    ),
]
MaxTokensOpt = Annotated[
    int, typer.Option("--max-tokens", min=0, help="Stop after this many tokens of the dataset (0: all of it).")
]
SeqLenOpt = Annotated[int, typer.Option("--seq-len", min=2, help="Tokens per window (documents are packed).")]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Windows per forward pass.")]
DeviceOpt = Annotated[
    str, typer.Option("--device", help="auto (CUDA if available, else CPU), cpu, cuda, cuda:N or mps.")
]
DtypeOpt = Annotated[
    str,
    typer.Option(
        "--dtype",
        help="auto (float32 on CPU, the checkpoint's dtype on GPU), float32, bfloat16 or float16.",
    ),
]
DeviceMapOpt = Annotated[
    str,
    typer.Option(
        "--device-map",
        help="none (the whole model on --device) or auto (accelerate spreads it over the GPUs, then CPU memory).",
    ),
]
WholeModelOpt = Annotated[
    bool,
    typer.Option(
        "--whole-model",
        help="Load the whole model at once instead of streaming it one decoder layer at a time (needs memory for "
        "every weight; for comparison).",
    ),
]
OffloadActivationsOpt = Annotated[
    bool,
    typer.Option(
        "--offload-activations",
        help="Keep activations in CPU memory between layers (the GPU then holds one layer and one batch).",
    ),
]

# ----------------------------------------------------------------------------- bad inputs
# Shared by the commands that write a model (merge, quantize, upcycle, distill).

AllowNonfiniteOpt = Annotated[
    bool,
    typer.Option(
        "--allow-nonfinite",
        help="Process an input whose weights hold NaN or Inf (refused by default), and publish an output "
        "that holds them, with a warning.",
    ),
]

# ----------------------------------------------------------------------------- publishing to the Hub
# Shared by the commands that write a model (merge, quantize, upcycle, distill).

PushToHubOpt = Annotated[
    str | None,
    typer.Option(
        "--push-to-hub",
        help="After the output is written and verified, upload it to this Hub model repo (owner/name; created if "
        "missing). Nothing is uploaded when a check fails.",
        show_default=False,
    ),
]
PrivateOpt = Annotated[bool, typer.Option("--private", help="--push-to-hub: create the repo private.")]
CreatePrOpt = Annotated[
    bool, typer.Option("--create-pr", help="--push-to-hub: open a pull request instead of committing to main.")
]
