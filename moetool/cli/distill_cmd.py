"""``moetool distill``: train a dense student of an MoE teacher's family by knowledge distillation."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from moetool.cli import options
from moetool.cli._errors import handle_errors
from moetool.cli._output import human_count, print_json, stdout, warn
from moetool.cli._progress import progress_display, progress_enabled
from moetool.cli._push import add_push, push_output, push_target, render_push
from moetool.distill.options import DistillOptions

if TYPE_CHECKING:
    from moetool.data import DatasetSpec
    from moetool.distill.api import DistillResult

EXAMPLES = """
Examples:

  moetool distill examples/tiny-moe -o tiny-dense -d examples/data/train.jsonl \
      --eval-dataset examples/data/heldout.jsonl

  moetool distill ./mixtral -o ./mistral-student -d corpus/ --init concat --intermediate-size 28672 --steps 2000

  moetool distill ./my-moe -o ./student -d train.jsonl --cache-topk 64 --dtype bfloat16

  accelerate launch -m moetool distill ./my-moe -o ./student -d train.jsonl --batch-size 16

  moetool distill ./my-moe -o ./student -d train.jsonl --resume     # after Ctrl-C
"""

# One place for the defaults (chosen by measurement, see docs/distill-results.md): the library's.
_DEFAULTS = DistillOptions()
_PANEL_DATA = "Data"
_PANEL_TRAIN = "Training"
_PANEL_OUT = "Output and checkpoints"


def _is_main_process() -> bool:
    # torchrun and accelerate launch set RANK; only process 0 draws progress and prints results.
    try:
        return int(os.environ.get("RANK", "0")) == 0
    except ValueError:
        return True


@handle_errors
def distill_cmd(
    teacher: Annotated[
        str, typer.Argument(help="The MoE teacher: a local checkpoint folder or a Hub repo id.", show_default=False)
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="The output folder for the student (new, or empty; see --overwrite).",
            show_default=False,
        ),
    ],
    dataset: Annotated[
        str,
        typer.Option(
            "--dataset",
            "-d",
            help="Training text: a .txt, .jsonl, .json, .csv, .tsv or .parquet file, a folder of them, or a Hub "
            "dataset id. Without --eval-dataset one document in 20 is held out for the perplexities.",
            show_default=False,
            rich_help_panel=_PANEL_DATA,
        ),
    ],
    eval_dataset: Annotated[
        str | None,
        typer.Option(
            "--eval-dataset",
            help="Held-out text for the perplexities of the teacher, the student at init and the trained student.",
            show_default=False,
            rich_help_panel=_PANEL_DATA,
        ),
    ] = None,
    text_field: Annotated[
        str, typer.Option("--text-field", help="The field (column) that holds the text.", rich_help_panel=_PANEL_DATA)
    ] = "text",
    split: Annotated[str, typer.Option("--split", help="The split of a Hub dataset.", rich_help_panel=_PANEL_DATA)] = (
        "train"
    ),
    data_files: options.DataFilesOpt = None,
    dataset_config: options.DatasetConfigOpt = None,
    max_train_tokens: Annotated[
        int,
        typer.Option(
            "--max-train-tokens",
            min=0,
            help="Read at most this many training tokens (0: all).",
            rich_help_panel=_PANEL_DATA,
        ),
    ] = 0,
    eval_max_tokens: Annotated[
        int,
        typer.Option(
            "--eval-max-tokens", min=0, help="Held-out tokens to evaluate on (0: all).", rich_help_panel=_PANEL_DATA
        ),
    ] = _DEFAULTS.eval_max_tokens,
    init: Annotated[
        str,
        typer.Option(
            "--init",
            help="The student at the start: from the teacher's experts through merge --to-dense (concat: the most used "
            "experts' neurons side by side; top1: the most used expert; average: the experts averaged), random, or "
            "the path of a dense checkpoint with the teacher's tokenizer.",
            rich_help_panel=_PANEL_TRAIN,
        ),
    ] = _DEFAULTS.init,
    intermediate_size: Annotated[
        int | None,
        typer.Option(
            "--intermediate-size",
            min=1,
            help="The student's FFN width for --init concat or random (default: top-k x expert width, the teacher's "
            "active width).",
            show_default=False,
            rich_help_panel=_PANEL_TRAIN,
        ),
    ] = None,
    steps: Annotated[
        int, typer.Option("--steps", min=1, help="Optimizer steps.", rich_help_panel=_PANEL_TRAIN)
    ] = _DEFAULTS.steps,
    lr: Annotated[
        float, typer.Option("--lr", help="Peak learning rate (AdamW).", rich_help_panel=_PANEL_TRAIN)
    ] = _DEFAULTS.lr,
    warmup_steps: Annotated[
        int | None,
        typer.Option(
            "--warmup-steps",
            min=0,
            help="Linear warmup steps (default: 5% of --steps).",
            show_default=False,
            rich_help_panel=_PANEL_TRAIN,
        ),
    ] = None,
    schedule: Annotated[
        str,
        typer.Option(
            "--schedule", help="Decay after warmup: cosine, linear or constant.", rich_help_panel=_PANEL_TRAIN
        ),
    ] = _DEFAULTS.schedule,
    min_lr_ratio: Annotated[
        float,
        typer.Option("--min-lr-ratio", help="Final learning rate as a fraction of --lr.", rich_help_panel=_PANEL_TRAIN),
    ] = _DEFAULTS.min_lr_ratio,
    weight_decay: Annotated[
        float, typer.Option("--weight-decay", help="AdamW weight decay on matrices.", rich_help_panel=_PANEL_TRAIN)
    ] = _DEFAULTS.weight_decay,
    optimizer: Annotated[
        str,
        typer.Option(
            "--optimizer",
            help="adamw, or adamw8bit (bitsandbytes' 8-bit AdamW: a quarter of the optimizer memory; CUDA only).",
            rich_help_panel=_PANEL_TRAIN,
        ),
    ] = _DEFAULTS.optimizer,
    max_grad_norm: Annotated[
        float, typer.Option("--max-grad-norm", help="Gradient clipping (0: off).", rich_help_panel=_PANEL_TRAIN)
    ] = _DEFAULTS.max_grad_norm,
    batch_size: Annotated[
        int,
        typer.Option("--batch-size", min=1, help="Windows per micro-batch, per process.", rich_help_panel=_PANEL_TRAIN),
    ] = _DEFAULTS.batch_size,
    grad_accum: Annotated[
        int,
        typer.Option("--grad-accum", min=1, help="Micro-batches per optimizer step.", rich_help_panel=_PANEL_TRAIN),
    ] = _DEFAULTS.grad_accum,
    seq_len: Annotated[
        int, typer.Option("--seq-len", min=2, help="Tokens per training window.", rich_help_panel=_PANEL_TRAIN)
    ] = _DEFAULTS.seq_len,
    temperature: Annotated[
        float,
        typer.Option(
            "--temperature", help="Softmax temperature of the KD term (KL scaled by T^2).", rich_help_panel=_PANEL_TRAIN
        ),
    ] = _DEFAULTS.temperature,
    alpha: Annotated[
        float,
        typer.Option(
            "--alpha",
            help="Weight of KL(teacher || student); 1 - alpha weighs cross-entropy on the data (0: no teacher).",
            rich_help_panel=_PANEL_TRAIN,
        ),
    ] = _DEFAULTS.alpha,
    cache_topk: Annotated[
        int,
        typer.Option(
            "--cache-topk",
            min=0,
            help="Cache the teacher's top-K log-probabilities per token before training and free the teacher "
            "(0: run the teacher beside the student, exact KL).",
            rich_help_panel=_PANEL_TRAIN,
        ),
    ] = _DEFAULTS.cache_topk,
    calibration_tokens: Annotated[
        int,
        typer.Option(
            "--calibration-tokens",
            min=1,
            help="Training tokens run through the teacher to pick and weigh the experts' neurons (--init from the "
            "teacher).",
            rich_help_panel=_PANEL_TRAIN,
        ),
    ] = _DEFAULTS.calibration_tokens,
    seed: Annotated[
        int,
        typer.Option("--seed", help="Seeds the data order and random initialisation.", rich_help_panel=_PANEL_TRAIN),
    ] = _DEFAULTS.seed,
    device: Annotated[
        str,
        typer.Option(
            "--device",
            help="auto (a GPU if there is one), cpu or cuda; under accelerate launch each process takes its GPU.",
            rich_help_panel=_PANEL_TRAIN,
        ),
    ] = "auto",
    dtype: Annotated[
        str,
        typer.Option(
            "--dtype",
            help="auto (float32 on CPU, bfloat16 mixed precision on GPU), float32, bfloat16 or float16 (mixed "
            "precision; the weights are trained in float32 and written in the teacher's dtype).",
            rich_help_panel=_PANEL_TRAIN,
        ),
    ] = "auto",
    threads: options.ThreadsOpt = _DEFAULTS.threads,
    whole_model: options.WholeModelOpt = False,
    eval_batch_size: Annotated[
        int,
        typer.Option(
            "--eval-batch-size", min=1, help="Windows per evaluation forward pass.", rich_help_panel=_PANEL_TRAIN
        ),
    ] = _DEFAULTS.eval_batch_size,
    log_every: Annotated[
        int, typer.Option("--log-every", min=1, help="Steps between loss-curve entries.", rich_help_panel=_PANEL_TRAIN)
    ] = _DEFAULTS.log_every,
    checkpoint_dir: Annotated[
        Path | None,
        typer.Option(
            "--checkpoint-dir",
            help="Where checkpoints go (default: OUT.partial); deleted after the output is published.",
            show_default=False,
            rich_help_panel=_PANEL_OUT,
        ),
    ] = None,
    save_every: Annotated[
        int, typer.Option("--save-every", min=1, help="Steps between checkpoints.", rich_help_panel=_PANEL_OUT)
    ] = _DEFAULTS.save_every,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume", help="Continue the run whose checkpoint is in --checkpoint-dir.", rich_help_panel=_PANEL_OUT
        ),
    ] = False,
    keep_checkpoint: Annotated[
        bool,
        typer.Option(
            "--keep-checkpoint", help="Keep the checkpoint folder after publishing.", rich_help_panel=_PANEL_OUT
        ),
    ] = False,
    max_shard_size: Annotated[
        str, typer.Option("--max-shard-size", help="Bound on each output shard.", rich_help_panel=_PANEL_OUT)
    ] = "5GB",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing output folder.", rich_help_panel=_PANEL_OUT)
    ] = False,
    allow_nonfinite: options.AllowNonfiniteOpt = False,
    revision: options.RevisionOpt = None,
    token: options.TokenOpt = None,
    offline: options.OfflineOpt = False,
    push_to_hub: options.PushToHubOpt = None,
    private: options.PrivateOpt = False,
    create_pr: options.CreatePrOpt = False,
    json_output: options.JsonOpt = False,
) -> None:
    """Distill an MoE TEACHER into a dense student of its family and write it as a standard checkpoint.

    The student starts from the teacher (attention, norms and embeddings copied, the FFN from the experts), and is trained on KL(teacher || student) at --temperature mixed with cross-entropy by --alpha. Checkpoints go to OUT.partial; Ctrl-C leaves one and --resume continues. At the end the perplexities of the teacher, the student at init and the trained student on held-out text are printed and recorded in the model card. Runs on CPU, one GPU, or several with accelerate launch -m moetool distill.
    """  # noqa: E501
    from moetool.io.sizes import parse_size

    opts = DistillOptions(
        init=init,
        intermediate_size=intermediate_size,
        steps=steps,
        lr=lr,
        warmup_steps=warmup_steps,
        schedule=schedule,
        min_lr_ratio=min_lr_ratio,
        weight_decay=weight_decay,
        optimizer=optimizer,
        max_grad_norm=max_grad_norm,
        batch_size=batch_size,
        grad_accum=grad_accum,
        seq_len=seq_len,
        temperature=temperature,
        alpha=alpha,
        cache_topk=cache_topk,
        dtype=dtype,
        seed=seed,
        calibration_tokens=calibration_tokens,
        eval_max_tokens=eval_max_tokens or None,
        eval_batch_size=eval_batch_size,
        save_every=save_every,
        log_every=log_every,
        max_train_tokens=max_train_tokens or None,
        threads=threads,
        whole_model=whole_model,
    )
    shard_size = parse_size(max_shard_size)
    hub = push_target(push_to_hub, private=private, create_pr=create_pr, token=token, offline=offline)

    def text(name: str) -> DatasetSpec:
        return options.dataset_spec(
            name, text_field=text_field, split=split, data_files=data_files, dataset_config=dataset_config
        )

    data, eval_data = text(dataset), (text(eval_dataset) if eval_dataset is not None else None)

    from moetool.distill.api import distill

    main = _is_main_process()
    show = main and progress_enabled(json_output)
    # Without a terminal: plain lines (each stage once, the loss every --log-every steps) for a log file.
    with progress_display(enabled=show, log=main and not json_output) as advance:
        result = distill(
            teacher,
            out,
            data=data,
            eval_data=eval_data,
            options=opts,
            checkpoint_dir=checkpoint_dir,
            resume=resume,
            keep_checkpoint=keep_checkpoint,
            device=device,
            revision=revision,
            token=token,
            offline=offline or None,
            max_shard_size=shard_size,
            overwrite=overwrite,
            allow_nonfinite=allow_nonfinite,
            command=["moetool", *sys.argv[1:]],
            progress=advance,
        )
    if not main:
        return
    pushed = push_output(hub, out, command="distill", json_output=json_output)
    for message in result.warnings:
        warn(message)
    if json_output:
        print_json(add_push(result.to_json(), pushed))
        return
    render(result)
    render_push(pushed)


def _minutes(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _vs(value: float | None, teacher: float) -> str:
    if value is None or not teacher:
        return ""
    return f"{100 * (value / teacher - 1):+.1f}%"


def render(result: DistillResult) -> None:
    """The human report: student, training, and the three perplexities."""
    console = stdout()
    student = result.student
    console.print(
        f"[bold]{escape(result.teacher)}[/bold] ({result.family}, {human_count(result.teacher_params)} parameters) "
        f"-> {escape(result.output)}",
        highlight=False,
    )
    console.print(
        f"  student: {student['architecture']}, {human_count(student['params'])} parameters, FFN width "
        f"{student['intermediate_size']}, init {escape(str(student['init']))}",
        highlight=False,
    )
    state = result.state
    curve = state.loss_curve
    resumed = f" (resumed at step {result.session_start_step})" if result.session_start_step else ""
    threads = f", {result.threads} CPU threads" if result.threads else ""
    console.print(
        f"  trained {result.options.steps} steps{resumed}, {state.tokens:,} tokens in {_minutes(state.elapsed_s)} "
        f"({result.session_tokens_per_s:,.0f} tok/s{threads})",
        highlight=False,
    )
    if curve:
        console.print(f"  loss {curve[0]['loss']:.4f} -> {curve[-1]['loss']:.4f} (KD {curve[0]['kd']:.4f} -> "
                      f"{curve[-1]['kd']:.4f})", highlight=False)  # fmt: skip
    ev = result.evaluation
    if ev is None:
        return
    console.print(f"held-out perplexity on {escape(ev.dataset)} ({ev.tokens:,} tokens):", highlight=False)
    table = Table(show_edge=False)
    table.add_column("model")
    table.add_column("perplexity", justify="right")
    table.add_column("vs teacher", justify="right")
    table.add_column("KL(teacher ‖ model)", justify="right")
    table.add_column("top-1 agreement", justify="right")

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    def num(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    table.add_row("teacher", num(ev.teacher, ".3f"), "", "", "")
    table.add_row("student at init", num(ev.student_init, ".3f"), _vs(ev.student_init, ev.teacher),
                  num(ev.init_kl, ".4f"), pct(ev.init_top1))  # fmt: skip
    table.add_row("student trained", num(ev.student, ".3f"), _vs(ev.student, ev.teacher), num(ev.kl, ".4f"),
                  pct(ev.top1))  # fmt: skip
    console.print(table)
