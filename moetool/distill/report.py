"""What a distillation run reports: the result document, the held-out figures and the model card.

:class:`DistillResult` is the ``--json`` document (``schema_version`` 1); :func:`publish` writes the student
through a staging folder as a standard dense checkpoint, loads it back the way users will to measure it,
writes the model card with the three perplexities (teacher, student at init, trained student), and lets
the staging folder be published atomically.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moetool.distill.options import DistillOptions
from moetool.distill.train import Progress, device_name

if TYPE_CHECKING:
    from moetool.data import Document
    from moetool.distill.checkpoint import TrainState
    from moetool.io.checkpoint import Checkpoint

SCHEMA_VERSION = 1


@dataclass
class Perplexities:
    """Held-out figures: the teacher, the student at initialisation and the trained student."""

    dataset: str
    tokens: int
    teacher: float
    student_init: float
    student: float | None = None
    init_kl: float | None = None
    init_top1: float | None = None
    kl: float | None = None
    top1: float | None = None

    def to_json(self) -> dict[str, Any]:
        from moetool.evaluate import _json_number

        ratio = self.student / self.teacher if self.student is not None and self.teacher else None
        return {
            "dataset": self.dataset,
            "tokens": self.tokens,
            "teacher_perplexity": _json_number(self.teacher),
            "student_init_perplexity": _json_number(self.student_init),
            "student_perplexity": _json_number(self.student),
            "student_over_teacher": _json_number(ratio),
            "student_init_kl": _json_number(self.init_kl),
            "student_init_top1_agreement": _json_number(self.init_top1),
            "student_kl": _json_number(self.kl),
            "student_top1_agreement": _json_number(self.top1),
        }


@dataclass
class DistillResult:
    """What :func:`distill` did (``to_json`` is the ``--json`` document, schema_version 1)."""

    teacher: str
    revision: str | None
    output: str
    family: str
    teacher_params: int
    student: dict[str, Any]
    options: DistillOptions
    dataset: str
    train_windows: int
    train_documents: int
    processes: int
    device: str
    mixed_precision: str
    threads: int | None
    state: TrainState
    session_start_step: int
    session_seconds: float
    session_tokens_per_s: float
    evaluation: Perplexities | None
    files: list[str]
    checkpoint_dir: str
    checkpoint_kept: bool
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        opts = self.options
        return {
            "schema_version": SCHEMA_VERSION,
            "teacher": self.teacher,
            "revision": self.revision,
            "output": self.output,
            "family": self.family,
            "teacher_params": self.teacher_params,
            "student": self.student,
            "training": {
                "dataset": self.dataset,
                "train_windows": self.train_windows,
                "train_documents": self.train_documents,
                "steps": opts.steps,
                "resumed_from_step": self.session_start_step or None,
                "tokens": self.state.tokens,
                "seq_len": opts.seq_len,
                "batch_size": opts.batch_size,
                "grad_accum": opts.grad_accum,
                "processes": self.processes,
                "windows_per_step": opts.batch_size * opts.grad_accum * self.processes,
                "lr": opts.lr,
                "warmup_steps": opts.warmup,
                "schedule": opts.schedule,
                "min_lr_ratio": opts.min_lr_ratio,
                "weight_decay": opts.weight_decay,
                "max_grad_norm": opts.max_grad_norm,
                "temperature": opts.temperature,
                "alpha": opts.alpha,
                "cache_topk": opts.cache_topk,
                "dtype": opts.dtype,
                "mixed_precision": self.mixed_precision,
                "device": self.device,
                "threads": self.threads,
                "seed": opts.seed,
                "seconds": round(self.state.elapsed_s, 3),
                "session_seconds": round(self.session_seconds, 3),
                "tokens_per_s": round(self.session_tokens_per_s, 1),
                "loss_curve": self.state.loss_curve,
            },
            "eval": None if self.evaluation is None else self.evaluation.to_json(),
            "files": self.files,
            "checkpoint_dir": self.checkpoint_dir,
            "checkpoint_kept": self.checkpoint_kept,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "warnings": self.warnings,
        }


def card_summary(result: DistillResult) -> str:
    """The model card's paragraph."""
    student = result.student
    opts = result.options
    lines = [
        f"A dense {student['architecture']} ({student['params']:,} parameters, FFN width "
        f"{student['intermediate_size']}) distilled by moetool from the Mixture-of-Experts {result.teacher} "
        f"({result.family}, {result.teacher_params:,} parameters). The student was {student['description']}, "
        f"then trained for {opts.steps} steps ({result.state.tokens:,} tokens of {result.dataset}) on "
        f"{opts.alpha:g} x KL(teacher || student) at temperature {opts.temperature:g} (scaled by T^2) + "
        f"{1 - opts.alpha:g} x cross-entropy"
        + (f", with the teacher's top-{opts.cache_topk} log-probabilities cached" if opts.cache_topk else "")
        + ".",
    ]
    if result.evaluation is not None and result.evaluation.student is not None:
        ev = result.evaluation
        lines += [
            "",
            f"Held-out perplexity ({ev.dataset}, {ev.tokens:,} tokens): teacher {ev.teacher:.3f}, student at "
            f"initialisation {ev.student_init:.3f}, trained student {ev.student:.3f}.",
        ]
    return "\n".join(lines)


def card_options(result: DistillResult) -> dict[str, Any]:
    opts = result.options
    return {
        "init": opts.init,
        "intermediate_size": result.student.get("intermediate_size"),
        "steps": opts.steps,
        "lr": opts.lr,
        "warmup_steps": opts.warmup,
        "schedule": opts.schedule,
        "batch_size": opts.batch_size,
        "grad_accum": opts.grad_accum,
        "processes": result.processes,
        "seq_len": opts.seq_len,
        "temperature": opts.temperature,
        "alpha": opts.alpha,
        "cache_topk": opts.cache_topk,
        "weight_decay": opts.weight_decay,
        "mixed_precision": result.mixed_precision,
        "seed": opts.seed,
        "dataset": result.dataset,
    }


def card_results(result: DistillResult) -> dict[str, Any]:
    figures: dict[str, Any] = {
        "teacher parameters": result.teacher_params,
        "student parameters": result.student.get("params"),
        "training tokens": result.state.tokens,
    }
    ev = result.evaluation
    if ev is not None:
        figures["evaluation text"] = ev.dataset
        figures["evaluation size (scored positions)"] = ev.tokens
        figures["teacher perplexity"] = ev.teacher
        figures["student perplexity at initialisation"] = ev.student_init
        figures["student perplexity (trained)"] = ev.student
        if ev.kl is not None:
            figures["KL(teacher ‖ student)"] = ev.kl
            figures["top-1 agreement with the teacher"] = ev.top1
    if result.state.loss_curve:
        first, last = result.state.loss_curve[0], result.state.loss_curve[-1]
        figures["training loss (first / last logged)"] = f"{first['loss']:.4f} / {last['loss']:.4f}"
    return figures


def checkpoint_params(checkpoint: Checkpoint) -> int:
    """Parameters stored in a checkpoint (from its headers)."""
    total = 0
    for info in checkpoint.tensors.values():
        count = 1
        for dim in info.shape:
            count *= dim
        total += count
    return total


def out_dtype(checkpoint: Checkpoint) -> str:
    """The dtype the student is written in: the teacher's stored float dtype (float32 when unknown)."""
    from moetool.merge.layout import FLOAT_DTYPES

    for info in checkpoint.tensors.values():
        if info.dtype in FLOAT_DTYPES:
            return FLOAT_DTYPES[info.dtype]
    return "float32"


def evaluate_on(
    model: Any,
    tokenizer: Any,
    documents: Sequence[Document],
    options: DistillOptions,
    *,
    reference: Any = None,
    stage: str,
    progress: Progress | None,
) -> Any:
    from moetool.evaluate import evaluate

    def advance(tokens: int) -> None:
        if progress is not None:
            progress(stage, tokens, options.eval_max_tokens, None)

    was_training = bool(getattr(model, "training", False))  # a streamed runner has no train mode
    if was_training:
        model.eval()
    try:
        return evaluate(
            model,
            tokenizer,
            documents,
            seq_len=options.seq_len,
            batch_size=options.eval_batch_size,
            max_tokens=options.eval_max_tokens,
            reference_model=reference,
            progress=advance,
        )
    finally:
        if was_training:
            model.train()


def publish(
    result: DistillResult,
    *,
    unwrapped: Any,
    checkpoint: Checkpoint,
    tokenizer: Any,
    heldout: Sequence[Document],
    teacher_model: Any,
    inputs: list[Path],
    overwrite: bool,
    shard_size: int,
    command: str | Sequence[str],
    progress: Progress | None,
    allow_nonfinite: bool = False,
) -> None:
    """Write the student through a staging folder, measure it as loaded back, write the card, publish."""
    import torch

    from moetool.io.model_card import write_model_card
    from moetool.io.writer import copy_aux_files, staged_output, write_json
    from moetool.modeling import load_weights, open_checkpoint, quiet_transformers

    dtype_name = out_dtype(checkpoint)
    with staged_output(
        Path(result.output), inputs=inputs, overwrite=overwrite, allow_nonfinite=allow_nonfinite
    ) as staging:
        state_dict = {k: v.detach().to(getattr(torch, dtype_name)) for k, v in unwrapped.state_dict().items()}
        with quiet_transformers():
            unwrapped.save_pretrained(staging, state_dict=state_dict, max_shard_size=shard_size)
        del state_dict
        config_path = staging / "config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["dtype"] = dtype_name
        config.pop("torch_dtype", None)
        write_json(config_path, config)
        if checkpoint.root is not None:
            copy_aux_files(checkpoint.root, staging)
        if heldout and result.evaluation is not None:
            # Measured on the written files, loaded the way users will: a save that lost or renamed a
            # tensor fails here (WEIGHTS_MISMATCH), before anything is published.
            written = load_weights(open_checkpoint(str(staging)), device=device_name(unwrapped.device), dtype="auto")
            figures = evaluate_on(
                written,
                tokenizer,
                heldout,
                result.options,
                reference=teacher_model,
                stage="evaluating trained student",
                progress=progress,
            )
            result.evaluation.student = figures.perplexity
            result.evaluation.kl = figures.kl
            result.evaluation.top1 = figures.top1_agreement
            del written
        else:
            load_weights(open_checkpoint(str(staging)), device="cpu", dtype="auto")
        result.files = [*sorted(p.name for p in staging.iterdir()), "README.md"]
        write_model_card(
            staging,
            base_models=[result.teacher],
            relation="distillation",
            command=command,
            options=card_options(result),
            revision=result.revision,
            tags=["distillation", "dense"],
            summary=card_summary(result),
            results=card_results(result),
        )
