"""``distill``: train a dense student of an MoE teacher's family by knowledge distillation, and write it.

The flow, one function (:func:`distill`):

1. check the options, the teacher (an MoE of a registered family), the output path and the checkpoint
   folder, before anything is loaded; tokenize the training text (holding out one document in 20 for
   evaluation when no ``eval_documents`` are given);
2. set up an Accelerator (CPU, one GPU, or data parallel under ``accelerate launch``), load the teacher,
   build the student (:mod:`moetool.distill.student`), measure the teacher's and the student's perplexity
   on the held-out text, and save a step-0 checkpoint; or, with ``resume``, restore the last checkpoint
   (the settings and data must be the same);
3. optionally cache the teacher's top-k log-probabilities and free the teacher;
4. train (:mod:`moetool.distill.train`), checkpointing every ``save_every`` steps, at the end and on
   Ctrl-C;
5. write the student as a standard dense checkpoint through a staging folder, load it back the way users
   will and measure its perplexity there, write the model card, publish atomically, and delete the
   checkpoint folder.
"""

from __future__ import annotations

import gc
import json
import os
import shlex
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moetool.distill import report
from moetool.distill.options import DistillOptions
from moetool.distill.report import SCHEMA_VERSION, DistillResult, Perplexities
from moetool.distill.train import DistillInterrupted, device_name
from moetool.errors import OutputError, UnsupportedArchitectureError, UsageError
from moetool.io.sizes import DEFAULT_MAX_SHARD_SIZE
from moetool.progress import TOKENS, Progress
from moetool.threads import choose_threads, thread_count

if TYPE_CHECKING:
    from moetool.data import DatasetSpec, Document
    from moetool.distill.checkpoint import TrainState
    from moetool.io.checkpoint import Checkpoint

#: The checkpoint folder beside ``OUT`` when none is given.
CHECKPOINT_SUFFIX = ".partial"
STUDENT_CONFIG = "student-config.json"
TEACHER_CACHE = "teacher-cache"

__all__ = ["SCHEMA_VERSION", "DistillInterrupted", "DistillResult", "default_checkpoint_dir", "distill"]


def default_checkpoint_dir(out: str | Path) -> Path:
    """``OUT.partial`` beside the output: where checkpoints go unless ``checkpoint_dir`` says otherwise."""
    out = Path(os.path.abspath(out))
    return out.parent / f"{out.name}{CHECKPOINT_SUFFIX}"


# ----------------------------------------------------------------------------- checks before loading


def check_teacher(checkpoint: Checkpoint, name: str) -> Any:
    """The teacher's family spec, refusing a dense model.

    Raises:
        UnsupportedArchitectureError: ``NOT_MOE`` for a dense family or a config without MoE layers.
    """
    from moetool.arch.dims import resolve_dims
    from moetool.arch.registry import family_for_config, require_capability

    spec = family_for_config(checkpoint.config)
    require_capability(spec, "distill")
    if not spec.is_moe or not resolve_dims(spec, checkpoint.config).moe_layers:
        raise UnsupportedArchitectureError(
            f"{name} is a dense {spec.name} model: distill takes a Mixture-of-Experts teacher",
            hint="pass an MoE checkpoint (Mixtral, Qwen-MoE, ...); a dense model can be the student: --init PATH",
            code="NOT_MOE",
        )
    return spec


def _check_paths(
    out: Path, checkpoint_dir: Path, inputs: list[Path], *, overwrite: bool, resume: bool
) -> tuple[bool, Path | None]:
    """Check the output and the checkpoint folder; returns ``(checkpoint folder exists, its checkpoint)``."""
    from moetool.distill.checkpoint import latest_checkpoint
    from moetool.io.writer import check_output_path

    check_output_path(out, inputs, overwrite=overwrite)
    if Path(os.path.abspath(checkpoint_dir)) == Path(os.path.abspath(out)):
        raise UsageError("--checkpoint-dir must not be the output folder", hint="leave it unset: OUT.partial")
    # The checkpoint folder is written into across sessions: it may hold things, but it must not be a
    # symlink or overlap an input or the output.
    check_output_path(checkpoint_dir, [*inputs, out], overwrite=True)
    existing = latest_checkpoint(checkpoint_dir) if checkpoint_dir.is_dir() else None
    if resume and existing is None:
        raise UsageError(
            f"--resume: there is no checkpoint in {checkpoint_dir}",
            hint="run without --resume to start, or pass the --checkpoint-dir of the interrupted run",
            code="NOTHING_TO_RESUME",
        )
    if not resume and existing is not None:
        raise OutputError(
            f"{checkpoint_dir} holds the checkpoint of an earlier run",
            hint="pass --resume to continue it, or delete the folder to start again",
            code="CHECKPOINT_EXISTS",
        )
    return checkpoint_dir.exists(), existing


def _fingerprint(options: DistillOptions, teacher: str, revision: str | None, data_fp: str, processes: int) -> dict:
    return {
        **options.fingerprint(),
        "teacher": teacher,
        "teacher_revision": revision,
        "data": data_fp,
        "processes": processes,
    }


def _check_resume(saved: dict[str, Any], wanted: dict[str, Any]) -> None:
    differ = [k for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)]
    if differ:
        shown = ", ".join(f"{k}: {saved.get(k)!r} -> {wanted.get(k)!r}" for k in differ[:4])
        more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
        raise UsageError(
            f"--resume: this run's settings differ from the checkpoint's ({shown}{more})",
            hint="resume with the options of the interrupted run, or delete its checkpoint folder to start again",
            code="RESUME_MISMATCH",
        )


# ----------------------------------------------------------------------------- runtime helpers


def _accelerator(device: str, dtype: str) -> Any:
    """The run's Accelerator: ``mixed_precision`` from ``--dtype``, CPU when asked or when there is no GPU.

    Raises:
        UsageError: an unknown device, a CUDA device that is not there, an Accelerator already set up in this
            process with other settings.
        UnsupportedArchitectureError: FSDP or DeepSpeed (distill runs data parallel).
    """
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    from moetool.modeling import check_dtype_name

    name = device.strip().lower()
    if name not in ("auto", "cpu", "cuda"):
        raise UsageError(
            f"--device {device}: distill runs on auto, cpu or cuda",
            hint="for several GPUs use accelerate launch -m moetool distill ...; each process takes its own GPU",
            code="DEVICE_INVALID",
        )
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available here", hint="use --device cpu (or auto)")
    cpu = name == "cpu" or not torch.cuda.is_available()
    dtype_name = check_dtype_name(dtype)
    if dtype_name == "auto":
        mixed = "no" if cpu else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    else:
        mixed = {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}[dtype_name]
    try:
        accelerator = Accelerator(cpu=cpu, mixed_precision=mixed)
    except ValueError as exc:
        raise UsageError(
            f"cannot set up accelerate: {str(exc).splitlines()[0]}",
            hint="run each distillation with other --dtype or --device settings in its own process",
            code="ACCELERATOR_INVALID",
        ) from None
    if accelerator.distributed_type not in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU):
        raise UnsupportedArchitectureError(
            f"distill runs data parallel; accelerate is configured for {accelerator.distributed_type.value}",
            hint="launch with a plain multi-GPU accelerate config (no FSDP or DeepSpeed)",
            code="DISTRIBUTED_UNSUPPORTED",
        )
    return accelerator


def _holds_no_weights(model: Any) -> bool:
    from moetool.runner.stream import StreamedModel

    return isinstance(model, StreamedModel)


def _teacher_windows(
    data: Any, options: DistillOptions, processes: int, rank: int, start: int
) -> Iterator[tuple[list[int], Any]]:
    """This process's training windows from stream position ``start`` to the end of the run, deduplicated,
    in batches of ``batch_size`` (what the teacher cache must hold)."""
    micro, accum = options.batch_size, options.grad_accum
    per_step = micro * accum * processes
    seen: set[int] = set()
    pending: list[int] = []
    first_step = start // per_step
    for step in range(first_step, options.steps):
        for m in range(accum):
            base = step * per_step + m * micro * processes + rank * micro
            for window in data.window_ids(base, micro, options.seed):
                if window not in seen:
                    seen.add(window)
                    pending.append(window)
                    if len(pending) == micro:
                        yield pending, data.batch(pending)
                        pending = []
        if len(seen) == data.num_windows:
            break
    if pending:
        yield pending, data.batch(pending)


# ----------------------------------------------------------------------------- the entry point


def distill(
    teacher: str,
    out: str | Path,
    *,
    data: DatasetSpec,
    eval_data: DatasetSpec | None = None,
    options: DistillOptions | None = None,
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    keep_checkpoint: bool = False,
    device: str = "auto",
    revision: str | None = None,
    token: str | bool | None = None,
    offline: bool | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    allow_nonfinite: bool = False,
    command: str | Sequence[str] | None = None,
    progress: Progress | None = None,
) -> DistillResult:
    """Distill the MoE ``teacher`` into a dense student and write it to ``out``.

    Args:
        teacher: a local MoE checkpoint folder or Hub repo id.
        out: the output folder (must not exist or be empty, unless ``overwrite``).
        data: the training text (read once; the windows come from ``options``: ``seq_len``,
            ``max_train_tokens``, ``calibration_tokens``).
        eval_data: held-out text for the perplexities; default: one document in 20 of ``data``, left out
            of training.
        options: the run's settings (:class:`DistillOptions`; defaults when None).
        checkpoint_dir: where checkpoints go (default ``OUT.partial``); removed after a successful run
            unless ``keep_checkpoint``.
        resume: continue the run whose checkpoint is in ``checkpoint_dir`` (same settings and data).
        keep_checkpoint: keep the checkpoint folder after publishing.
        device: ``auto`` (a GPU when there is one), ``cpu`` or ``cuda``; under ``accelerate launch`` each
            process takes the GPU accelerate gives it.
        revision / token / offline: Hub access for ``teacher``.
        max_shard_size: bound on each output shard, in bytes.
        overwrite: replace an existing output folder (still staged and swapped).
        allow_nonfinite: take a teacher holding NaN/Inf (refused otherwise) and publish such a student.
        command: the command line, for the model card and the resume hint.
        progress: reports each stage (:mod:`moetool.progress`): ``training`` in steps, with the loss as detail.

    Returns:
        The result (on every process; only the main process writes files).

    Raises:
        UsageError: options out of range, ``--resume`` without a checkpoint or with other settings.
        OutputError: the output or checkpoint folder is unusable, or holds an earlier run's checkpoint.
        UnsupportedArchitectureError: ``NOT_MOE`` teacher, ``NOT_DENSE`` checkpoint student, a family without
            a dense counterpart.
        DatasetError: training text that does not fill one window.
        DistillInterrupted: Ctrl-C or SIGTERM during training (a resumable checkpoint is left).
        MoetoolError: whatever loading, merging or evaluating raises.
    """
    options = options or DistillOptions()
    options.check()
    _precheck(teacher, out, revision=revision, token=token, offline=offline, overwrite=overwrite)
    started = time.perf_counter()
    out_path = Path(os.path.abspath(out))
    ckpt_dir = Path(os.path.abspath(checkpoint_dir)) if checkpoint_dir is not None else default_checkpoint_dir(out)
    checkpoint, spec, inputs = _open_teacher(
        teacher, options, revision=revision, token=token, offline=offline, allow_nonfinite=allow_nonfinite
    )
    _check_paths(out_path, ckpt_dir, inputs, overwrite=overwrite, resume=resume)
    _check_init(options, resume)
    _check_student_family(spec, options, resume)
    documents = data.load()
    eval_documents = eval_data.load() if eval_data is not None else None
    accelerator = _accelerator(device, options.dtype)
    threads = None
    if accelerator.device.type == "cpu" and accelerator.num_processes == 1:
        threads = choose_threads(options.threads).threads
    run = _Run(
        teacher=teacher,
        checkpoint=checkpoint,
        spec=spec,
        out_path=out_path,
        ckpt_dir=ckpt_dir,
        inputs=inputs,
        options=options,
        resume=resume,
        keep_checkpoint=keep_checkpoint,
        accelerator=accelerator,
        threads=threads,
        revision=revision,
        token=token,
        offline=offline,
        shard_size=max_shard_size,
        overwrite=overwrite,
        allow_nonfinite=allow_nonfinite,
        command=command,
        progress=progress,
        started=started,
        dataset_name=data.dataset,
    )
    eval_name = eval_data.dataset if eval_data is not None else ""
    with _cleanup_on_failure(ckpt_dir, accelerator), thread_count(threads):
        return _run(run, documents, eval_documents, eval_name)


def _precheck(
    teacher: str,
    out: str | Path,
    *,
    revision: str | None,
    token: str | bool | None,
    offline: bool | None,
    overwrite: bool,
) -> None:
    """The cheap checks first, from headers and paths only: a typo should not cost a dataset read or a load."""
    from moetool.io.source import parse_model_ref
    from moetool.io.writer import check_output_path
    from moetool.validate import preflight

    local = parse_model_ref(teacher, revision=revision).local_path
    check_output_path(Path(out), [local] if local is not None else [], overwrite=overwrite)
    preflight(teacher, revision=revision, token=token, offline=offline, float_weights=True)


def _open_teacher(
    teacher: str,
    options: DistillOptions,
    *,
    revision: str | None,
    token: str | bool | None,
    offline: bool | None,
    allow_nonfinite: bool,
) -> tuple[Checkpoint, Any, list[Path]]:
    """Open and check the teacher; returns it, its family spec, and the inputs the outputs must not touch."""
    from moetool.modeling import open_checkpoint
    from moetool.validate import check_input

    checkpoint = open_checkpoint(teacher, revision=revision, token=token, offline=offline)
    check_input(checkpoint, float_weights=True, allow_nonfinite=allow_nonfinite)
    spec = check_teacher(checkpoint, teacher)
    inputs = [checkpoint.root] if checkpoint.root is not None else []
    if options.init_is_path and Path(options.init).exists():
        inputs.append(Path(options.init))
    return checkpoint, spec, inputs


def _check_init(options: DistillOptions, resume: bool) -> None:
    """Refuse an ``--init`` that is neither a method, an existing folder, nor a Hub id (a fresh run)."""
    if not resume and options.init_is_path and not Path(options.init).expanduser().exists() and "/" not in options.init:
        raise UsageError(
            f"unknown --init {options.init!r}",
            hint="use concat, top1, average, random, or the path of a dense checkpoint",
            code="OPTION_INVALID",
        )


def _check_student_family(spec: Any, options: DistillOptions, resume: bool) -> None:
    """A student built by moetool (from the teacher's experts, or random) is the teacher family's dense
    counterpart: refuse a family that has none before anything is read or loaded."""
    if resume or options.init_is_path or spec.dense_counterpart:
        return
    raise UnsupportedArchitectureError(
        f"--init {options.init}: moetool knows no dense architecture for {spec.name} teachers to build the student in",
        hint="pass --init PATH, a dense checkpoint that shares the teacher's tokenizer (students built from the "
        "teacher: Mixtral, Qwen2-MoE, Qwen3-MoE)",
        code="NO_DENSE_COUNTERPART",
    )


@contextmanager
def _cleanup_on_failure(ckpt_dir: Path, accelerator: Any) -> Iterator[None]:
    """A run that fails or is interrupted before its first checkpoint leaves nothing behind."""
    from moetool.distill.checkpoint import latest_checkpoint

    created = not ckpt_dir.exists()
    try:
        yield
    except BaseException:
        if created and accelerator.is_main_process and latest_checkpoint(ckpt_dir) is None:
            import shutil

            shutil.rmtree(ckpt_dir, ignore_errors=True)
        raise


def _resume_command(command: str | Sequence[str] | None, teacher: str, out: Path) -> str:
    from moetool.io.model_card import redact_command

    if command is None:
        return f"moetool distill {shlex.quote(teacher)} -o {shlex.quote(str(out))} ... --resume"
    text = redact_command(command)
    return text if "--resume" in text.split() else f"{text} --resume"


@dataclass
class _Run:
    """What the steps of one distillation share: the request, the runtime, and what earlier steps built."""

    teacher: str
    checkpoint: Checkpoint
    spec: Any
    out_path: Path
    ckpt_dir: Path
    inputs: list[Path]
    options: DistillOptions
    resume: bool
    keep_checkpoint: bool
    accelerator: Any
    threads: int | None
    revision: str | None
    token: str | bool | None
    offline: bool | None
    shard_size: int
    overwrite: bool
    allow_nonfinite: bool
    command: str | Sequence[str] | None
    progress: Progress | None
    started: float
    dataset_name: str
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    resume_hint: str = ""
    tokenizer: Any = None
    # set by _prepare_data
    data: Any = None
    train_docs: list[Document] = field(default_factory=list)
    heldout: list[Document] = field(default_factory=list)
    heldout_name: str = ""
    # set by _load_state and later steps
    state: TrainState | None = None
    existing: Path | None = None
    student: Any = None
    cache: Any = None
    cache_expected: Any = None
    teacher_model: Any = None
    model: Any = None
    unwrapped: Any = None
    optimizer: Any = None

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def processes(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def device(self) -> Any:
        return self.accelerator.device

    @property
    def need_cache(self) -> bool:
        return self.options.cache_topk > 0

    @property
    def live(self) -> bool:
        """Whether the teacher runs beside the student at every step (KD on, no cache)."""
        return self.options.alpha > 0 and not self.need_cache

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()


def _run(
    run: _Run, documents: Sequence[Document], eval_documents: Sequence[Document] | None, eval_name: str
) -> DistillResult:
    """The run after the checks: data, state, student, teacher, measurements, training, publishing."""
    _start(run)
    _prepare_data(run, documents, eval_documents, eval_name)
    _load_state(run)
    needs_teacher_eval = not run.state.measurements
    _init_student(run)
    _open_teacher_cache(run)
    _load_teacher(run, needs_teacher_eval)
    if needs_teacher_eval and run.is_main and run.heldout:
        _measure_before(run)
    run.state.measurements = run.state.measurements or {}
    save = _prepare_training(run)
    if run.need_cache and run.cache is None:
        _fill_teacher_cache(run)
    _free_teacher(run)
    from moetool.distill.train import run_training

    session = run_training(
        accelerator=run.accelerator,
        model=run.model,
        unwrapped=run.unwrapped,
        optimizer=run.optimizer,
        teacher=run.teacher_model if run.live else None,
        cache=run.cache,
        data=run.data,
        options=run.options,
        state=run.state,
        checkpoint_dir=run.ckpt_dir,
        save=save,
        resume_hint=run.resume_hint,
        progress=run.progress,
    )
    run.timings["train_s"] = session.seconds
    result = _result(run, session)
    _publish(run, result)
    if run.is_main and not run.keep_checkpoint:
        import shutil

        shutil.rmtree(run.ckpt_dir, ignore_errors=True)
    run.timings["total_s"] = time.perf_counter() - run.started
    result.timings = run.timings
    return result


def _start(run: _Run) -> None:
    """The resume hint, the sequence-length check and the teacher's tokenizer."""
    from moetool.evaluate import check_seq_len
    from moetool.modeling import load_tokenizer

    run.resume_hint = _resume_command(run.command, run.teacher, run.out_path)
    if run.processes > 1:
        run.resume_hint += f" (launched the same way, {run.processes} processes)"
    check_seq_len(run.checkpoint.config, run.options.seq_len, run.teacher)
    run.tokenizer = load_tokenizer(run.checkpoint)


def _prepare_data(
    run: _Run, documents: Sequence[Document], eval_documents: Sequence[Document] | None, eval_name: str
) -> None:
    """Split off the held-out text and tokenize the training windows.

    Before any model is loaded: a dataset too small for one window should not cost a load.
    """
    from moetool.distill.data import build_train_data, split_heldout

    t0 = time.perf_counter()
    documents = list(documents)
    if eval_documents is not None:
        run.train_docs, run.heldout = documents, list(eval_documents)
        run.heldout_name = eval_name
    else:
        run.train_docs, run.heldout = split_heldout(documents)
        run.heldout_name = f"{run.dataset_name} (1 document in 20, held out of training)"
        if not run.heldout:
            run.train_docs = documents
            run.warnings.append("fewer than 20 documents and no --eval-dataset: no held-out perplexity is measured")
    run.data = build_train_data(
        run.tokenizer,
        run.train_docs,
        seq_len=run.options.seq_len,
        max_tokens=run.options.max_train_tokens,
        name=run.dataset_name,
    )
    run.timings["tokenize_s"] = time.perf_counter() - t0


def _load_state(run: _Run) -> None:
    """A fresh training state, or the one of the checkpoint to resume (whose settings must match)."""
    from moetool.distill import checkpoint as ckpt

    fingerprint = _fingerprint(run.options, run.teacher, run.checkpoint.revision, run.data.fingerprint, run.processes)
    run.existing = ckpt.latest_checkpoint(run.ckpt_dir) if run.resume else None
    if run.existing is not None:
        run.state, _ = ckpt.read_state(run.existing)
        _check_resume(run.state.fingerprint, fingerprint)
    else:
        run.state = ckpt.TrainState(fingerprint=fingerprint)
    if run.is_main:
        run.ckpt_dir.mkdir(parents=True, exist_ok=True)
    run.barrier()


def _init_student(run: _Run) -> None:
    """Build the student (a fresh run) or recreate it from the saved config (a resumed one)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from moetool.distill.student import build_student
    from moetool.io.writer import write_json

    t0 = time.perf_counter()
    if run.existing is None:
        merge_progress = None
        progress = run.progress
        if progress is not None:

            def merge_progress(stage: str, advance: float = 0, total: float | None = None, **kwargs: Any) -> None:
                progress(f"student init: {stage}", advance, total, **kwargs)

        student, info = build_student(
            run.teacher,
            run.checkpoint,
            run.options,
            calibration=run.train_docs,
            calibration_name=run.dataset_name,
            work_dir=run.ckpt_dir,
            device=device_name(run.device),
            teacher_tokenizer=run.tokenizer,
            revision=run.revision,
            token=run.token,
            offline=run.offline,
            is_main=run.is_main,
            barrier=run.barrier,
            progress=merge_progress,
        )
        run.state.student = info.to_json()
        if run.is_main:
            write_json(run.ckpt_dir / STUDENT_CONFIG, student.config.to_dict())
    else:
        config_dict = dict(json.loads((run.ckpt_dir / STUDENT_CONFIG).read_text(encoding="utf-8")))
        config = AutoConfig.for_model(
            config_dict.pop("model_type"), **{k: v for k, v in config_dict.items() if k != "transformers_version"}
        )
        student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        student.train()
    run.student = student
    run.timings["student_init_s"] = time.perf_counter() - t0


def _open_teacher_cache(run: _Run) -> None:
    """With ``cache_topk``: open the teacher cache if a complete one is there (else it is filled later)."""
    if not run.need_cache:
        return
    from moetool.distill import teacher_cache as tc

    options = run.options
    vocab = int(run.student.get_input_embeddings().weight.shape[0])
    run.cache_expected = tc.expected_meta(
        k=options.cache_topk,
        temperature=options.temperature,
        fingerprint=run.data.fingerprint,
        teacher=run.teacher,
        windows=run.data.num_windows,
        seq_len=options.seq_len,
        vocab=vocab,
    )
    run.cache = tc.open_cache(run.ckpt_dir / TEACHER_CACHE, run.cache_expected)
    if options.cache_topk > vocab:
        raise UsageError(f"--cache-topk {options.cache_topk} is more than the vocabulary ({vocab} tokens)")


def _teacher_dtype(accelerator: Any) -> str:
    """The teacher's dtype: the Accelerator's mixed precision, float32 without."""
    if accelerator.mixed_precision == "no":
        return "float32"
    return "bfloat16" if accelerator.mixed_precision == "bf16" else "float16"


def _load_teacher(run: _Run, needs_teacher_eval: bool) -> None:
    """Load the teacher when something still needs it: live KD, the first measurements, or the cache."""
    from moetool.modeling import load_weights

    if not (run.live or needs_teacher_eval or (run.need_cache and run.cache is None)):
        return
    t0 = time.perf_counter()
    device, dtype = device_name(run.device), _teacher_dtype(run.accelerator)
    if run.live or run.options.whole_model:
        # Beside the student, the teacher runs every training step: it must be in memory.
        run.teacher_model = load_weights(run.checkpoint, device=device, dtype=dtype)
        run.teacher_model.requires_grad_(False)
    else:
        # Its evaluations and the top-k cache are passes over fixed windows: one layer at a time.
        from moetool.runner.stream import StreamedModel, StreamOptions

        run.teacher_model = StreamedModel(run.checkpoint, StreamOptions(device=device, dtype=dtype))
    run.timings["teacher_load_s"] = time.perf_counter() - t0


def _measure_before(run: _Run) -> None:
    """The teacher's and the initial student's perplexity on the held-out text (main process)."""
    t0 = time.perf_counter()
    run.student.to(run.device)
    teacher_eval = report.evaluate_on(
        run.teacher_model, run.tokenizer, run.heldout, run.options, stage="evaluating teacher", progress=run.progress
    )
    init_eval = report.evaluate_on(
        run.student,
        run.tokenizer,
        run.heldout,
        run.options,
        reference=run.teacher_model,
        stage="evaluating student",
        progress=run.progress,
    )
    run.state.measurements = {
        "dataset": run.heldout_name,
        "tokens": teacher_eval.tokens,
        "teacher": teacher_eval.perplexity,
        "student_init": init_eval.perplexity,
        "init_kl": init_eval.kl,
        "init_top1": init_eval.top1_agreement,
    }
    run.timings["eval_before_s"] = time.perf_counter() - t0


def _prepare_training(run: _Run) -> Callable[[], Path]:
    """The optimizer, the Accelerator's wrapping, the resumed optimizer state, and the step-0 checkpoint.

    Returns:
        ``save``: writes a checkpoint of the current state (every process calls it).
    """
    from moetool.distill import checkpoint as ckpt
    from moetool.distill.optim import make_optimizer
    from moetool.distill.train import param_groups

    accelerator, state = run.accelerator, run.state
    groups = param_groups(run.student, run.options.weight_decay)
    optimizer = make_optimizer(run.options.optimizer, groups, run.options.lr, accelerator.device)
    run.model, run.optimizer = accelerator.prepare(run.student, optimizer)
    run.unwrapped = accelerator.unwrap_model(run.model)
    if run.existing is not None:
        # The optimizer state goes in after prepare, onto the parameters where they now live.
        ckpt.load_checkpoint(run.existing, model=run.unwrapped, optimizer=run.optimizer, rank=run.rank)
    state.sessions.append(state.step)

    def save() -> Path:
        return ckpt.save_checkpoint(
            run.ckpt_dir, model=run.unwrapped, optimizer=run.optimizer, state=state, rank=run.rank,
            world_size=run.processes, barrier=run.barrier,
        )  # fmt: skip

    if run.existing is None:
        save()  # step 0: from here on Ctrl-C always leaves something to resume
    return save


def _fill_teacher_cache(run: _Run) -> None:
    """Run the teacher over this process's training windows and cache its top-k log-probabilities."""
    from moetool.distill import teacher_cache as tc

    assert run.cache_expected is not None and run.teacher_model is not None
    progress = run.progress
    t0 = time.perf_counter()
    folder = run.ckpt_dir / TEACHER_CACHE
    if run.is_main:
        tc.create_cache(folder, run.cache_expected, create=True)
    run.barrier()
    run.cache = tc.create_cache(folder, run.cache_expected, create=False)

    def on_batch(tokens: int) -> None:
        if progress is not None:
            progress("caching teacher", tokens, None, unit=TOKENS)

    try:
        tc.fill_cache(
            run.cache,
            run.teacher_model,
            _teacher_windows(run.data, run.options, run.processes, run.rank, run.state.windows_consumed),
            temperature=run.options.temperature,
            on_batch=on_batch,
        )
    except KeyboardInterrupt:
        raise DistillInterrupted(
            f"interrupted while caching the teacher; the step-{run.state.step} checkpoint in {run.ckpt_dir} is kept",
            hint=f"resume with: {run.resume_hint}",
        ) from None
    run.barrier()
    if run.is_main:
        run.cache.mark_complete()
    run.barrier()
    run.timings["teacher_cache_s"] = time.perf_counter() - t0


def _free_teacher(run: _Run) -> None:
    """Training reads the cache: the teacher can go (the point of caching).

    A streamed teacher holds no weights between passes and stays, for the final comparison.
    """
    if run.cache is None or run.live or _holds_no_weights(run.teacher_model):
        return
    import torch

    run.teacher_model = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _result(run: _Run, session: Any) -> DistillResult:
    """The result object, with the measurements taken before training (the final ones come at publishing)."""
    state = run.state
    result = DistillResult(
        teacher=run.teacher,
        revision=run.checkpoint.revision,
        output=str(run.out_path),
        family=run.spec.name,
        teacher_params=report.checkpoint_params(run.checkpoint),
        student=state.student,
        options=run.options,
        dataset=run.dataset_name,
        train_windows=run.data.num_windows,
        train_documents=run.data.documents,
        processes=run.processes,
        device=device_name(run.device),
        mixed_precision=str(run.accelerator.mixed_precision),
        threads=run.threads,
        state=state,
        session_start_step=session.start_step,
        session_seconds=session.seconds,
        session_tokens_per_s=session.tokens_per_s,
        evaluation=None,
        files=[],
        checkpoint_dir=str(run.ckpt_dir),
        checkpoint_kept=run.keep_checkpoint,
        warnings=run.warnings,
    )
    if state.measurements:
        m = state.measurements
        result.evaluation = Perplexities(
            dataset=m["dataset"],
            tokens=m["tokens"],
            teacher=m["teacher"],
            student_init=m["student_init"],
            init_kl=m.get("init_kl"),
            init_top1=m.get("init_top1"),
        )
    return result


def _publish(run: _Run, result: DistillResult) -> None:
    """Write the student, load it back and measure it, write the card, publish (main process)."""
    try:
        if run.is_main:
            t0 = time.perf_counter()
            report.publish(
                result,
                unwrapped=run.unwrapped,
                checkpoint=run.checkpoint,
                tokenizer=run.tokenizer,
                heldout=run.heldout,
                teacher_model=run.teacher_model,
                inputs=run.inputs,
                overwrite=run.overwrite,
                allow_nonfinite=run.allow_nonfinite,
                shard_size=run.shard_size,
                command=run.command or f"moetool distill {run.teacher} -o {run.out_path}",
                progress=run.progress,
            )
            run.timings["write_eval_s"] = time.perf_counter() - t0
        run.barrier()
    except KeyboardInterrupt:
        raise DistillInterrupted(
            f"interrupted after training; nothing was written to {run.out_path}",
            hint=f"the trained student is in {run.ckpt_dir}; write it with: {run.resume_hint}",
        ) from None
