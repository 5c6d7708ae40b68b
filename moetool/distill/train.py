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
from dataclasses import dataclass, field
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

    processes = accelerator.num_processes
    loop = _Loop(
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        teacher=teacher,
        use_teacher=options.alpha > 0 and cache is None,
        cache=cache,
        data=data,
        options=options,
        state=state,
        per_step=options.batch_size * options.grad_accum * processes,
        seq_len=int(data.windows.shape[1]),
    )
    session = Session(start_step=state.step)
    model.train()
    stop = StopFlag()
    in_step = False
    loop.started = time.perf_counter()
    try:
        with stop.installed():
            while state.step < options.steps:
                step_started = time.perf_counter()
                in_step = True
                lr = _set_lr(optimizer, options, state.step)
                sums = _accumulate(loop, torch)
                _update(loop)
                in_step = False
                tokens_per_s = _count_step(loop, session, sums, time.perf_counter() - step_started)
                if state.step % options.log_every == 0 or state.step == options.steps:
                    _log_curve(loop, lr, torch)
                if progress is not None:
                    try:
                        _report_step(progress, options, state.step, sums, lr, tokens_per_s)
                    except KeyboardInterrupt:  # raised by a caller's callback: a stop request like Ctrl-C
                        stop.requested = True
                if _stop_everywhere(accelerator, stop.requested):
                    _save(loop, save)
                    raise DistillInterrupted(
                        f"interrupted at step {state.step}/{options.steps}; checkpoint saved in {checkpoint_dir}",
                        hint=f"resume with: {resume_hint}",
                    )
                if state.step % options.save_every == 0 or state.step == options.steps:
                    _save(loop, save)
    except KeyboardInterrupt:
        # A second Ctrl-C, or one that reached us outside the handler: the update in flight may be half
        # applied, so nothing is saved; the last checkpoint stands.
        where = "in the middle of a step" if in_step else f"at step {state.step}"
        raise DistillInterrupted(
            f"interrupted {where}; the last checkpoint in {checkpoint_dir} is kept",
            hint=f"resume with: {resume_hint}",
        ) from None
    return session


@dataclass
class _Loop:
    """What the steps of the training loop share, and the loss-curve window since the last entry."""

    accelerator: Any
    model: Any
    optimizer: Any
    teacher: Any | None
    use_teacher: bool  # the live teacher runs at every step (KD on, no cache)
    cache: TeacherCache | None
    data: TrainData
    options: DistillOptions
    state: TrainState
    per_step: int
    seq_len: int
    started: float = 0.0
    window_sums: dict[str, float] = field(default_factory=lambda: _empty_window())
    window_start: float = field(default_factory=time.perf_counter)
    window_tokens: int = 0


def _empty_window() -> dict[str, float]:
    return {"loss": 0.0, "kd": 0.0, "ce": 0.0, "steps": 0}


def _set_lr(optimizer: Any, options: DistillOptions, step: int) -> float:
    """Set this step's learning rate from the schedule; returns it."""
    from moetool.distill.schedule import lr_factor

    lr = options.lr * lr_factor(
        step,
        total=options.steps,
        warmup=options.warmup,
        schedule=options.schedule,
        min_ratio=options.min_lr_ratio,
    )
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def _accumulate(loop: _Loop, torch: Any) -> list[float]:
    """Forward and backward over this step's micro-batches; returns the step's mean loss, KD and CE."""
    from moetool.distill.loss import kd_loss

    accelerator, options, state, data = loop.accelerator, loop.options, loop.state, loop.data
    processes, rank = accelerator.num_processes, accelerator.process_index
    micro, accum = options.batch_size, options.grad_accum
    device = accelerator.device
    sums = [0.0, 0.0, 0.0]
    for m in range(accum):
        base = state.windows_consumed + m * micro * processes + rank * micro
        ids = data.window_ids(base, micro, options.seed)
        input_ids = data.batch(ids).to(device)
        labels = input_ids[:, 1:]
        mask = torch.ones_like(labels)
        # Gradients are all-reduced only on the last micro-batch of a step.
        sync = contextlib.nullcontext() if m == accum - 1 else accelerator.no_sync(loop.model)
        with sync:
            # The teacher first: its activations are gone before the student's are built.
            teacher_logits = teacher_topk = None
            if loop.use_teacher:
                with torch.no_grad(), accelerator.autocast():
                    teacher_logits = forward_logits(loop.teacher, input_ids)[:, :-1]
            elif loop.cache is not None:
                teacher_topk = loop.cache.read(ids, device)
            with accelerator.autocast():
                logits = forward_logits(loop.model, input_ids)[:, :-1]
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
    return sums


def _update(loop: _Loop) -> None:
    """Clip, step and zero the gradients, and move the state one step on."""
    options, state = loop.options, loop.state
    if options.max_grad_norm > 0:
        loop.accelerator.clip_grad_norm_(loop.model.parameters(), options.max_grad_norm)
    loop.optimizer.step()
    loop.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.windows_consumed += loop.per_step
    state.tokens += loop.per_step * loop.seq_len


def _count_step(loop: _Loop, session: Session, sums: list[float], elapsed: float) -> float:
    """Add the step to the session's figures and the loss-curve window; returns its tokens per second."""
    tokens = loop.per_step * loop.seq_len
    session.seconds += elapsed
    session.tokens += tokens
    loop.window_tokens += tokens
    for key, value in zip(("loss", "kd", "ce"), sums, strict=True):
        loop.window_sums[key] += value
    loop.window_sums["steps"] += 1
    return tokens / elapsed if elapsed > 0 else 0.0


def _log_curve(loop: _Loop, lr: float, torch: Any) -> None:
    """A loss-curve entry: the mean over the processes and over the steps since the last entry."""
    sums = loop.window_sums
    means = torch.tensor([sums["loss"], sums["kd"], sums["ce"]], device=loop.accelerator.device)
    means = loop.accelerator.reduce(means, reduction="mean") / sums["steps"]
    window_time = time.perf_counter() - loop.window_start
    loop.state.loss_curve.append(
        {
            "step": loop.state.step,
            "loss": round(float(means[0]), 5),
            "kd": round(float(means[1]), 5),
            "ce": round(float(means[2]), 5),
            "lr": lr,
            "tokens_per_s": round(loop.window_tokens / window_time, 1) if window_time > 0 else 0.0,
        }
    )
    loop.window_sums = _empty_window()
    loop.window_start, loop.window_tokens = time.perf_counter(), 0


def _report_step(
    progress: Progress, options: DistillOptions, step: int, sums: list[float], lr: float, tokens_per_s: float
) -> None:
    """Report the step (the loss as detail; a log line every ``log_every`` steps and at the end)."""
    detail = (
        f"step {step}/{options.steps}  loss {sums[0]:.4f} (kd {sums[1]:.4f}, "
        f"ce {sums[2]:.4f})  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s"
    )
    log = step % options.log_every == 0 or step == options.steps
    progress("training", 1, options.steps, unit=STEPS, detail=detail, log=log)


def _save(loop: _Loop, save: Callable[[], Path]) -> None:
    """Add the time since the last save to the state, and checkpoint."""
    loop.state.elapsed_s += time.perf_counter() - loop.started
    loop.started = time.perf_counter()
    save()
