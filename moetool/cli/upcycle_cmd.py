"""``moetool upcycle``: a dense model to a Mixture-of-Experts model that computes the same function."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from moetool.cli import options
from moetool.cli._errors import handle_errors
from moetool.cli._output import human_bytes, human_count, print_json, stdout, warn
from moetool.cli._progress import progress_display, progress_enabled
from moetool.cli._push import add_push, push_output, push_target, render_push
from moetool.cli._threads import use_threads

EXAMPLES = """
Examples:

  moetool upcycle ./llama-1b -o ./llama-8x1b --num-experts 8 --top-k 2

  moetool upcycle Qwen/Qwen2.5-0.5B -o ./qwen-moe -e 8 -k 2 --granularity 4 --shared-experts 1

  moetool upcycle ./qwen3 -o ./qwen3-moe -e 8 -k 2 --moe-layers every:2 --dry-run

  moetool upcycle ./mistral -o ./moe -e 8 -k 2 --router-init kmeans --dataset corpus.jsonl
"""


@handle_errors
def upcycle_cmd(
    model: options.ModelArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="The new model folder (must not exist, or --overwrite).")],
    num_experts: Annotated[
        int, typer.Option("--num-experts", "-e", help="Copies of the dense FFN per MoE layer (E).", show_default=False)
    ],
    top_k: Annotated[
        int, typer.Option("--top-k", "-k", help="Copies each token is routed to (K <= E).", show_default=False)
    ],
    granularity: Annotated[
        int,
        typer.Option(
            "--granularity",
            "-g",
            help="Split each copy into G fine-grained experts of width I/G: the config gets E*G experts, top-k K*G.",
        ),
    ] = 1,
    shared_experts: Annotated[
        int,
        typer.Option(
            "--shared-experts", help="Copies of the dense FFN in an always-on shared expert (families that have one)."
        ),
    ] = 0,
    moe_layers: Annotated[
        str,
        typer.Option(
            "--moe-layers", help="Which layers become MoE: all, every:N (every N-th), or a list like 0,2,4-7."
        ),
    ] = "all",
    arch: Annotated[
        str | None,
        typer.Option("--arch", help="Target MoE family (default: the dense family's counterpart, e.g. mixtral)."),
    ] = None,
    router_init: Annotated[
        str,
        typer.Option(
            "--router-init",
            help="random (small Gaussian rows), zeros (G=1 only), or kmeans (clusters of hidden states over "
            "--dataset; loads the dense model into memory).",
        ),
    ] = "random",
    noise: Annotated[
        float,
        typer.Option("--noise", help="Add N(0, (s*std)^2) noise to each expert copy. Breaks exactness (reported)."),
    ] = 0.0,
    reinit_ratio: Annotated[
        float,
        typer.Option(
            "--reinit-ratio",
            help="Drop-Upcycling: re-initialise this fraction of each copy's neurons. Breaks exactness (reported).",
        ),
    ] = 0.0,
    seed: Annotated[int, typer.Option("--seed", help="Seed of every random choice (router, noise, k-means).")] = 0,
    dtype: Annotated[
        str, typer.Option("--dtype", help="auto (keep the source dtype), float32, bfloat16 or float16.")
    ] = "auto",
    max_shard_size: Annotated[
        str, typer.Option("--max-shard-size", help="Largest weight file, e.g. 5GB, 500MB, 2GiB.")
    ] = "5GB",
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan and the predicted output size; write nothing.")
    ] = False,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify/--no-verify",
            help="Check the output against the dense model (layer by layer; full logits when it fits in memory) "
            "before publishing it.",
        ),
    ] = True,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.")] = False,
    allow_nonfinite: options.AllowNonfiniteOpt = False,
    dataset: Annotated[
        str | None,
        typer.Option("--dataset", "-d", help="Text for --router-init kmeans (file, folder or Hub dataset id)."),
    ] = None,
    text_field: options.TextFieldOpt = "text",
    split: options.SplitOpt = "train",
    data_files: options.DataFilesOpt = None,
    dataset_config: options.DatasetConfigOpt = None,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", min=1, help="Tokens of --dataset to cluster (kmeans).")
    ] = 4096,
    seq_len: options.SeqLenOpt = 256,
    device: options.DeviceOpt = "auto",
    threads: options.ThreadsOpt = 0,
    revision: options.RevisionOpt = None,
    token: options.TokenOpt = None,
    offline: options.OfflineOpt = False,
    push_to_hub: options.PushToHubOpt = None,
    private: options.PrivateOpt = False,
    create_pr: options.CreatePrOpt = False,
    json_output: options.JsonOpt = False,
) -> None:
    """Upcycle a dense Llama, Mistral, Qwen2 or Qwen3 model into a Mixture-of-Experts model.

    Every expert starts as a copy of the dense MLP and the routing weights sum to 1, so the new model
    reproduces the dense one; the result is checked before it is published. Tensors are streamed:
    memory holds about one layer, whatever the model size.
    """
    from moetool.io.sizes import parse_size
    from moetool.upcycle import UpcycleOptions, upcycle

    opts = UpcycleOptions(
        num_experts=num_experts,
        top_k=top_k,
        granularity=granularity,
        shared_experts=shared_experts,
        moe_layers=moe_layers,
        arch=arch,
        router_init=router_init,
        noise=noise,
        reinit_ratio=reinit_ratio,
        seed=seed,
        dtype=dtype,
        max_shard_size=parse_size(max_shard_size),
    )
    hub = push_target(push_to_hub, private=private, create_pr=create_pr, token=token, offline=offline, dry_run=dry_run)
    kmeans = None
    if dataset is not None:
        kmeans = options.dataset_spec(
            dataset,
            text_field=text_field,
            split=split,
            data_files=data_files,
            dataset_config=dataset_config,
            max_tokens=max_tokens,
            seq_len=seq_len,
            batch_size=4,
        )
    show = progress_enabled(json_output)
    # A dry run only plans (no torch): no threads to set.
    threads_used = None if dry_run else use_threads(threads, json_output=json_output)

    with progress_display(enabled=show) as progress:
        result = upcycle(
            model,
            out,
            opts,
            dry_run=dry_run,
            verify=verify,
            overwrite=overwrite,
            allow_nonfinite=allow_nonfinite,
            kmeans_data=kmeans,
            device=device,
            revision=revision,
            token=token,
            offline=offline or None,
            command=["moetool", *sys.argv[1:]],
            progress=progress,
        )
    pushed = push_output(hub, out, command="upcycle", json_output=json_output)
    if json_output:
        print_json(add_push({**result.to_json(), "threads": threads_used}, pushed))
        return
    for message in result.plan.warnings:
        warn(message)
    render(result)
    render_push(pushed)


def render(result) -> None:
    """Print the plan (and, after a real run, what was written and checked) on stdout."""
    plan = result.plan
    d = plan.describe()
    console = stdout()
    verb = "would write" if result.dry_run else "wrote"
    console.print(
        f"[bold]{plan.source_name}[/bold] ({d['source_family']}) -> {d['target_family']} "
        f"{'(dry run)' if result.dry_run else result.output}",
        highlight=False,
    )
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim")
    grid.add_column(justify="right", style="bold")
    grid.add_column()
    copies = f"{d['copies']} copies, top-{d['copies_per_token']}"
    if d["granularity"] > 1:
        copies += f", granularity {d['granularity']}"
    grid.add_row("experts", f"{d['num_experts']} x {d['expert_width']}", f"top-{d['top_k']} ({copies})")
    if d["shared_width"] is not None:
        grid.add_row("shared expert", f"width {d['shared_width']}", f"{d['shared_experts']} dense copies")
    grid.add_row("MoE layers", f"{len(d['moe_layers'])}/{d['num_layers']}", d["moe_layers_spec"])
    grid.add_row("parameters", human_count(d["total_params"]), f"from {human_count(d['source_params'])} dense")
    grid.add_row("active per token", human_count(d["active_params"]), "")
    grid.add_row("dtype", d["dtype"], "")
    size = result.bytes_written if result.bytes_written is not None else d["predicted_bytes"]
    grid.add_row(f"{verb}", human_bytes(size), f"{len(d['files'])} weight file(s), {d['num_tensors']} tensors")
    sb = d["symmetry_breaking"]
    breaking = f"router {sb['router_init']}"
    if sb["noise"]:
        breaking += f", noise {sb['noise']:g}"
    if sb["reinit_ratio"]:
        breaking += f", reinit {sb['reinit_ratio']:g}"
    grid.add_row("symmetry", "exact" if d["exact"] else "NOT exact", breaking + f", seed {sb['seed']}")
    console.print(grid)
    if result.verification is not None:
        for check in result.verification.checks:
            verdict = {True: "[green]ok[/green]", False: "[red]FAILED[/red]", None: "[yellow]info[/yellow]"}[
                check.passed
            ]
            figures = ""
            if check.max_abs_diff is not None:
                figures = f"max abs diff {check.max_abs_diff:.2e} (tol {check.tolerance:.1e})"
            console.print(f"  check {check.name:<8} {verdict}  {figures}  [dim]{check.detail}[/dim]", highlight=False)
        for note in result.verification.notes:
            console.print(f"  [dim]{note}[/dim]", highlight=False)
    elif not result.dry_run:
        console.print("  [yellow]not verified[/yellow] (--no-verify)", highlight=False)
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in result.timings.items())
    console.print(f"[dim]{timings}[/dim]", highlight=False)
