"""Resumable training state: safetensors and JSON only, replaced atomically.

A checkpoint is a folder ``checkpoint/`` inside the run's checkpoint folder:

* ``state.json``: the step, the number of windows consumed (the data position), tokens trained on, the
  loss curve, the measurements taken before training (teacher and student-at-init perplexities), the
  student's description and the settings fingerprint a resumed run must match;
* ``student.safetensors``: the student's float32 weights (tied tensors once), written like every output
  (:class:`moetool.io.shards.ShardWriter`);
* ``optimizer.safetensors`` + the optimizer's hyper-parameters in ``state.json``: AdamW's moments and step
  counts; the learning-rate schedule is a function of the step (:mod:`moetool.distill.schedule`), so it
  needs no state of its own;
* ``rng-rank{N}.safetensors`` + ``state.json``: every process's torch (CPU and CUDA) and Python random
  states, so that dropout, where a model has it, continues as it would have.

Nothing is pickled (moetool never loads pickle). A new checkpoint is written into ``checkpoint.tmp``, then
swapped in with renames (the previous one is moved to ``checkpoint.old`` first and deleted last), so a
crash at any moment leaves a complete checkpoint: :func:`latest_checkpoint` falls back to
``checkpoint.old`` when ``checkpoint`` is missing.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moetool.errors import CheckpointError

if TYPE_CHECKING:
    import torch

CHECKPOINT = "checkpoint"
STATE_NAME = "state.json"
MODEL_NAME = "student.safetensors"
OPTIMIZER_NAME = "optimizer.safetensors"
FORMAT = "moetool-distill-checkpoint"
VERSION = 1


@dataclass
class TrainState:
    """Where a run stands (everything in ``state.json`` except the optimizer and RNG details).

    Attributes:
        step: optimizer steps done.
        windows_consumed: training windows read so far, over all processes (the data position).
        tokens: tokens the student was trained on.
        elapsed_s: training seconds so far (over all sessions of the run).
        loss_curve: ``{step, loss, kd, ce, lr, tokens_per_s}`` every ``log_every`` steps.
        fingerprint: the settings and inputs that decide the trajectory.
        measurements: figures taken before training (perplexities of the teacher and the student at init).
        student: the student's :class:`~moetool.distill.student.StudentInit` as JSON.
        sessions: the step each session of the run started at (``[0, 120]`` after one resume at 120).
    """

    step: int = 0
    windows_consumed: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0
    loss_curve: list[dict[str, float]] = field(default_factory=list)
    fingerprint: dict[str, Any] = field(default_factory=dict)
    measurements: dict[str, Any] = field(default_factory=dict)
    student: dict[str, Any] = field(default_factory=dict)
    sessions: list[int] = field(default_factory=list)


def _tensors_file(path: Path, tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
    """One safetensors file ``path`` (never sharded), tensor by tensor; no file when there is no tensor (an
    optimizer before its first step has no state)."""
    from moetool.io.shards import ShardWriter

    with ShardWriter(path.parent, stem=path.name.removesuffix(".safetensors"), max_shard_size=sys.maxsize) as writer:
        for name, tensor in tensors:
            writer.add(name, tensor)
        if not writer.num_tensors:
            writer.abort()


def _optimizer_parts(optimizer: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer state dict split into tensors and JSON (param groups, non-tensor state values)."""
    import torch

    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for param_id, values in state_dict["state"].items():
        for name, value in values.items():
            key = f"{param_id}.{name}"
            if torch.is_tensor(value):
                tensors[key] = value
            else:
                scalars[key] = value
    groups = json.loads(json.dumps(state_dict["param_groups"], default=list))
    return tensors, {"param_groups": groups, "scalars": scalars}


def _rng_parts() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    import torch

    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{index}"] = state
    version, internal, gauss = random.getstate()
    return tensors, {"python": [version, list(internal), gauss]}


def _swap_in(folder: Path, tmp: Path) -> None:
    current = folder / CHECKPOINT
    old = folder / f"{CHECKPOINT}.old"
    if current.exists():
        # ``checkpoint`` is complete, so an ``old`` beside it is stale. Without ``checkpoint``, ``old`` may be
        # the only complete one (a crash between the renames below): it goes only after ``tmp`` is in place.
        shutil.rmtree(old, ignore_errors=True)
        os.rename(current, old)
    os.rename(tmp, current)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(
    folder: Path,
    *,
    model: Any,
    optimizer: Any,
    state: TrainState,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
) -> Path:
    """Write a checkpoint of ``model`` (unwrapped), ``optimizer`` and ``state`` into ``folder``.

    Every process calls it: each writes its RNG state, the main process (rank 0) the rest and the swap.

    Returns:
        The checkpoint folder.
    """
    from moetool.io.shards import unique_state_tensors
    from moetool.io.writer import write_json

    tmp = folder / f"{CHECKPOINT}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    rng_tensors, rng_json = _rng_parts()
    _tensors_file(tmp / f"rng-rank{rank}.safetensors", rng_tensors.items())
    write_json(tmp / f"rng-rank{rank}.json", rng_json)
    if rank == 0:
        _tensors_file(tmp / MODEL_NAME, unique_state_tensors(model))
        opt_tensors, opt_json = _optimizer_parts(optimizer)
        _tensors_file(tmp / OPTIMIZER_NAME, opt_tensors.items())
        document = {"format": FORMAT, "version": VERSION, "world_size": world_size, **asdict(state)}
        document["optimizer"] = opt_json
        write_json(tmp / STATE_NAME, document)
    barrier()
    if rank == 0:
        _swap_in(folder, tmp)
    barrier()
    return folder / CHECKPOINT


def latest_checkpoint(folder: Path) -> Path | None:
    """The complete checkpoint in ``folder`` (``checkpoint/``, else ``checkpoint.old/``), if any."""
    for name in (CHECKPOINT, f"{CHECKPOINT}.old"):
        candidate = folder / name
        if (candidate / STATE_NAME).is_file() and (candidate / MODEL_NAME).is_file():
            return candidate
    return None


def read_state(checkpoint: Path) -> tuple[TrainState, dict[str, Any]]:
    """The state of a checkpoint folder and the rest of its ``state.json`` (optimizer, world size).

    Raises:
        CheckpointError: ``CHECKPOINT_INVALID`` when the file is not a distill checkpoint.
    """
    try:
        document = json.loads((checkpoint / STATE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(
            f"cannot read the distill checkpoint {checkpoint / STATE_NAME}: {exc}",
            hint="delete the checkpoint folder and start again",
            code="CHECKPOINT_INVALID",
        ) from None
    if not isinstance(document, dict) or document.get("format") != FORMAT or document.get("version") != VERSION:
        raise CheckpointError(
            f"{checkpoint} is not a moetool distill checkpoint (format {FORMAT} version {VERSION})",
            hint="point --checkpoint-dir at the folder a distill run wrote, or delete it",
            code="CHECKPOINT_INVALID",
        )
    names = {f.name for f in TrainState.__dataclass_fields__.values()}
    state = TrainState(**{k: v for k, v in document.items() if k in names})
    rest = {k: v for k, v in document.items() if k not in names}
    return state, rest


def load_checkpoint(checkpoint: Path, *, model: Any, optimizer: Any | None, rank: int = 0) -> TrainState:
    """Restore ``model`` (unwrapped), ``optimizer`` and this process's RNG from ``checkpoint``.

    Raises:
        CheckpointError: a missing or unreadable part, or weights that do not fit the model.
    """
    import torch
    from safetensors.torch import load_file, load_model

    state, rest = read_state(checkpoint)
    try:
        load_model(model, str(checkpoint / MODEL_NAME), strict=True)
        if optimizer is not None:
            optimizer_file = checkpoint / OPTIMIZER_NAME
            tensors = load_file(str(optimizer_file)) if optimizer_file.is_file() else {}
            saved = rest["optimizer"]
            per_param: dict[int, dict[str, Any]] = {}
            for key, value in tensors.items():
                param_id, name = key.split(".", 1)
                per_param.setdefault(int(param_id), {})[name] = value
            for key, value in saved["scalars"].items():
                param_id, name = key.split(".", 1)
                per_param.setdefault(int(param_id), {})[name] = value
            groups = saved["param_groups"]
            for group in groups:
                if isinstance(group.get("betas"), list):
                    group["betas"] = tuple(group["betas"])
            optimizer.load_state_dict({"state": per_param, "param_groups": groups})
        rng_file = checkpoint / f"rng-rank{rank}.safetensors"
        if rng_file.is_file():
            rng = load_file(str(rng_file))
            torch.set_rng_state(rng["torch"])
            cuda_states = [rng[k] for k in sorted(rng) if k.startswith("cuda.")]
            if cuda_states and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
            python = json.loads((checkpoint / f"rng-rank{rank}.json").read_text(encoding="utf-8"))["python"]
            random.setstate((python[0], tuple(python[1]), python[2]))
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"cannot restore the distill checkpoint {checkpoint}: {type(exc).__name__}: {exc}".splitlines()[0],
            hint="the checkpoint is damaged or belongs to another student; delete it and start again",
            code="CHECKPOINT_INVALID",
        ) from None
    return state
