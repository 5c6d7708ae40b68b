"""The training loop: an Accelerator, gradient accumulation, a learning-rate schedule, checkpoints, Ctrl-C.

One optimizer step reads ``batch_size x grad_accum`` windows per process from the stream of windows
(:mod:`moetool.distill.data`): micro-batch ``m`` of a step covers stream positions
``[base + m*B*P, base + (m+1)*B*P)`` and process ``r`` takes its ``r``-th slice of ``B``, so the batches
depend only on the data position, the seed and the batch geometry. The same command therefore runs on one
CPU, one GPU, or several GPUs under ``accelerate launch`` (data parallel: each process a slice, gradients
averaged by the Accelerator).

Ctrl-C and SIGTERM do not kill the loop in the middle of an update: the first signal sets a flag, the loop
finishes the optimizer step it is in (the partial accumulation is dropped), saves a checkpoint at that
step and raises :class:`DistillInterrupted` (exit code 130), whose hint says how to resume. With several
processes the flag is all-reduced at every step so they all stop at the same step. A second signal stops
at once, keeping the previous checkpoint.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moetool.errors import EXIT_INTERRUPTED, MoetoolError
from moetool.progress import STEPS, Progress

if TYPE_CHECKING:
    import torch

    from moetool.distill.checkpoint import TrainState
    from moetool.distill.data import TrainData
    from moetool.distill.options import DistillOptions
    from moetool.distill.teacher_cache import TeacherCache


class DistillInterrupted(MoetoolError):
    """Ctrl-C or SIGTERM stopped the run; a checkpoint says where (exit code 130)."""

    default_code = "INTERRUPTED"
    exit_code = EXIT_INTERRUPTED


class StopFlag:
    """Turns SIGINT/SIGTERM into a request to stop at the next step boundary (a second one stops at once)."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None

    def _handler(self, signum: int, _frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopFlag]:
        """Install the handlers for the block (main thread only: signals are delivered there)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous: dict[int, Any] = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            current = signal.getsignal(signum)
            if current is signal.SIG_IGN:
                continue
            previous[signum] = current
            signal.signal(signum, self._handler)
        try:
            yield self
        finally:
            for signum, old in previous.items():
                signal.signal(signum, old if old is not None else signal.SIG_DFL)


@dataclass
class Session:
    """What this session of the run did (a resumed run has several sessions)."""

    start_step: int
    seconds: float = 0.0
    tokens: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


def device_name(device: Any) -> str:
    """A torch device as ``--device`` spells it: ``cpu`` (accelerate says ``cpu:0`` in multi-CPU runs) or
    ``cuda:N``."""
    if device.type == "cpu":
        return "cpu"
    return f"{device.type}:{device.index}" if device.index is not None else device.type


def forward_logits(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """A causal LM's logits for full windows (no padding, no KV cache)."""
    return model(input_ids=input_ids, use_cache=False).logits


def param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices, none on norms, biases and the embeddings (input and output)."""
    skip = {id(model.get_input_embeddings().weight)}
    output = model.get_output_embeddings()
    if output is not None:
        skip.add(id(output.weight))
    decay, no_decay = [], []
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        (decay if parameter.ndim >= 2 and id(parameter) not in skip else no_decay).append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _stop_everywhere(accelerator: Any, local: bool) -> bool:
    """Whether any process wants to stop (all processes call this at the same steps)."""
    if accelerator.num_processes == 1:
        return local
    import torch

    flag = torch.tensor([1.0 if local else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def run_training(
    *,
    accelerator: Any,
    model: Any,
    unwrapped: Any,
    optimizer: Any,
    teacher: Any | None,
    cache: TeacherCache | None,
    data: TrainData,
    options: DistillOptions,
    state: TrainState,
    checkpoint_dir: Path,
    save: Callable[[], Path],
    resume_hint: str,
    progress: Progress | None = None,
) -> Session:
    """Train until ``state.step == options.steps``, saving every ``save_every`` steps and at the end.

    Args:
        accelerator: the run's Accelerator.
        model / optimizer: prepared by the Accelerator.
        unwrapped: the student without its data-parallel wrapper.
        teacher: the teacher (eval mode, on the Accelerator's device) for the live KD term, or None.
        cache: the teacher's cached top-k, or None.
        data: the training windows.
        options: the run's settings.
        state: updated in place (step, data position, tokens, loss curve, elapsed time).
        checkpoint_dir: where ``save`` writes (for messages).
        save: writes a checkpoint of the current state (every process calls it).
        resume_hint: how to resume, for the interruption message.
        progress: see :data:`Progress`.

    Returns:
        This session's figures.

    Raises:
        DistillInterrupted: Ctrl-C or SIGTERM (after saving a checkpoint at the last finished step).
        MoetoolError: ``NON_FINITE`` when the loss becomes NaN or infinite.
    """
    import torch

    from moetool.distill.loss import kd_loss
    from moetool.distill.schedule import lr_factor

    processes, rank = accelerator.num_processes, accelerator.process_index
    micro, accum = options.batch_size, options.grad_accum
    per_step = micro * accum * processes
    seq_len = int(data.windows.shape[1])
    device = accelerator.device
    use_teacher = options.alpha > 0 and cache is None
    session = Session(start_step=state.step)
    window_sums = {"loss": 0.0, "kd": 0.0, "ce": 0.0, "steps": 0}
    window_start = time.perf_counter()
    window_tokens = 0
    model.train()
    stop = StopFlag()
    in_step = False
    started = time.perf_counter()
    try:
        with stop.installed():
            while state.step < options.steps:
                step_started = time.perf_counter()
                in_step = True
                lr = options.lr * lr_factor(
                    state.step,
                    total=options.steps,
                    warmup=options.warmup,
                    schedule=options.schedule,
                    min_ratio=options.min_lr_ratio,
                )
                for group in optimizer.param_groups:
                    group["lr"] = lr
                sums = [0.0, 0.0, 0.0]
                for m in range(accum):
                    base = state.windows_consumed + m * micro * processes + rank * micro
                    ids = data.window_ids(base, micro, options.seed)
                    input_ids = data.batch(ids).to(device)
                    labels = input_ids[:, 1:]
                    mask = torch.ones_like(labels)
                    # Gradients are all-reduced only on the last micro-batch of a step.
                    sync = contextlib.nullcontext() if m == accum - 1 else accelerator.no_sync(model)
                    with sync:
                        # The teacher first: its activations are gone before the student's are built.
                        teacher_logits = teacher_topk = None
                        if use_teacher:
                            with torch.no_grad(), accelerator.autocast():
                                teacher_logits = forward_logits(teacher, input_ids)[:, :-1]
                        elif cache is not None:
                            teacher_topk = cache.read(ids, device)
                        with accelerator.autocast():
                            logits = forward_logits(model, input_ids)[:, :-1]
                        parts = kd_loss(
                            logits,
                            labels,
                            mask,
                            alpha=options.alpha,
                            temperature=options.temperature,
                            teacher_logits=teacher_logits,
                            teacher_topk=teacher_topk,
                        )
                        if not math.isfinite(float(parts.loss.detach())):
                            raise MoetoolError(
                                f"the loss became {float(parts.loss.detach())} at step {state.step + 1}",
                                hint="lower --lr, or train in --dtype float32",
                                code="NON_FINITE",
                            )
                        accelerator.backward(parts.loss / accum)
                    sums[0] += float(parts.loss.detach()) / accum
                    sums[1] += parts.kd / accum
                    sums[2] += parts.ce / accum
                    del logits, teacher_logits, teacher_topk, parts
                if options.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), options.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.windows_consumed += per_step
                state.tokens += per_step * seq_len
                in_step = False

                elapsed = time.perf_counter() - step_started
                session.seconds += elapsed
                session.tokens += per_step * seq_len
                window_tokens += per_step * seq_len
                for key, value in zip(("loss", "kd", "ce"), sums, strict=True):
                    window_sums[key] += value
                window_sums["steps"] += 1
                tokens_per_s = per_step * seq_len / elapsed if elapsed > 0 else 0.0
                if state.step % options.log_every == 0 or state.step == options.steps:
                    # Mean over the processes and over the steps since the last entry.
                    means = torch.tensor([window_sums["loss"], window_sums["kd"], window_sums["ce"]], device=device)
                    means = accelerator.reduce(means, reduction="mean") / window_sums["steps"]
                    window_time = time.perf_counter() - window_start
                    state.loss_curve.append(
                        {
                            "step": state.step,
                            "loss": round(float(means[0]), 5),
                            "kd": round(float(means[1]), 5),
                            "ce": round(float(means[2]), 5),
                            "lr": lr,
                            "tokens_per_s": round(window_tokens / window_time, 1) if window_time > 0 else 0.0,
                        }
                    )
                    window_sums = {"loss": 0.0, "kd": 0.0, "ce": 0.0, "steps": 0}
                    window_start, window_tokens = time.perf_counter(), 0
                if progress is not None:
                    try:
                        detail = (
                            f"step {state.step}/{options.steps}  loss {sums[0]:.4f} (kd {sums[1]:.4f}, "
                            f"ce {sums[2]:.4f})  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s"
                        )
                        log = state.step % options.log_every == 0 or state.step == options.steps
                        progress("training", 1, options.steps, unit=STEPS, detail=detail, log=log)
                    except KeyboardInterrupt:  # raised by a caller's callback: a stop request like Ctrl-C
                        stop.requested = True
                if _stop_everywhere(accelerator, stop.requested):
                    state.elapsed_s += time.perf_counter() - started
                    started = time.perf_counter()
                    save()
                    raise DistillInterrupted(
                        f"interrupted at step {state.step}/{options.steps}; checkpoint saved in {checkpoint_dir}",
                        hint=f"resume with: {resume_hint}",
                    )
                if state.step % options.save_every == 0 or state.step == options.steps:
                    state.elapsed_s += time.perf_counter() - started
                    started = time.perf_counter()
                    save()
    except KeyboardInterrupt:
        # A second Ctrl-C, or one that reached us outside the handler: the update in flight may be half
        # applied, so nothing is saved; the last checkpoint stands.
        where = "in the middle of a step" if in_step else f"at step {state.step}"
        raise DistillInterrupted(
            f"interrupted {where}; the last checkpoint in {checkpoint_dir} is kept",
            hint=f"resume with: {resume_hint}",
        ) from None
    return session
