"""The student at initialisation: from the teacher's experts, random, or an existing dense checkpoint.

From the teacher (``concat``, ``top1``, ``average``), the student is exactly what ``moetool merge
--to-dense`` writes: the teacher's attention, norms and embeddings copied, each MoE layer's experts
aggregated into one FFN, in the family's dense architecture (Mixtral -> Mistral, Qwen3-MoE -> Qwen3, ...).
It is written by :func:`moetool.merge.merge` into a folder inside the checkpoint folder, loaded, and the
folder removed (the step-0 checkpoint holds the weights from then on). ``random`` builds the same dense
config with freshly initialised weights. A path is loaded as it is, after checking that it is dense and
shares the teacher's tokenizer.
"""

from __future__ import annotations

import gc
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moetool.errors import UnsupportedArchitectureError
from moetool.progress import Progress

if TYPE_CHECKING:
    from moetool.data import Document
    from moetool.distill.options import DistillOptions
    from moetool.io.checkpoint import Checkpoint

INIT_FOLDER = "init-student"


@dataclass
class StudentInit:
    """How the student was initialised.

    Attributes:
        init: the ``--init`` value (a strategy, or the checkpoint path).
        description: one sentence for the report and the model card.
        model_type: the student's model_type.
        architecture: its transformers class name.
        intermediate_size: its FFN width.
        params: its parameters (tied embeddings once).
        merge: from the teacher: what merge did (calibration tokens, per-layer experts kept).
    """

    init: str
    description: str
    model_type: str
    architecture: str
    intermediate_size: int | None
    params: int
    merge: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "init": self.init,
            "description": self.description,
            "model_type": self.model_type,
            "architecture": self.architecture,
            "intermediate_size": self.intermediate_size,
            "params": self.params,
            "merge": self.merge or None,
        }


def count_params(model: Any) -> int:
    """Parameters of a model, tied ones counted once (``parameters()`` already deduplicates)."""
    return sum(p.numel() for p in model.parameters())


def default_width(checkpoint: Checkpoint) -> int:
    """The teacher's active FFN width: top-k x expert width (what ``merge --to-dense`` defaults to)."""
    from moetool.arch.dims import resolve_dims
    from moetool.arch.registry import family_for_config
    from moetool.merge.plan import moe_width

    spec = family_for_config(checkpoint.config)
    dims = resolve_dims(spec, checkpoint.config)
    top_k = dims.values["K"]
    top_k = max(top_k) if isinstance(top_k, list) else int(top_k)
    return top_k * moe_width(dims, min(dims.moe_layers))


def dense_student_config(checkpoint: Checkpoint, width: int) -> Any:
    """The transformers config of the teacher's dense counterpart with FFN width ``width``."""
    from transformers import AutoConfig

    from moetool.arch.registry import family_for_config
    from moetool.merge.plan import dense_config, dense_target

    spec = family_for_config(checkpoint.config)
    new, _ = dense_config(checkpoint.config, spec, dense_target(spec), width)
    kwargs = {k: v for k, v in new.items() if k not in ("model_type", "transformers_version")}
    return AutoConfig.for_model(new["model_type"], **kwargs)


def _describe_merge(result: Any) -> dict[str, Any]:
    return {
        "dense_strategy": result.dense_strategy,
        "refit_down": result.refit_down,
        "calibration_tokens": result.calibration.get("tokens"),
        "layers": [{"layer": d.layer, "experts": d.groups[0]} for d in result.layers],
    }


def build_student(
    teacher: str,
    checkpoint: Checkpoint,
    options: DistillOptions,
    *,
    calibration: Sequence[Document],
    calibration_name: str,
    work_dir: Path,
    device: str,
    teacher_tokenizer: Any,
    revision: str | None = None,
    token: str | bool | None = None,
    offline: bool | None = None,
    is_main: bool = True,
    barrier: Callable[[], None] = lambda: None,
    progress: Progress | None = None,
) -> tuple[Any, StudentInit]:
    """Build the student (float32, on the CPU, train mode) as ``options.init`` says.

    Args:
        teacher: the teacher as the user named it.
        checkpoint: the teacher, opened.
        options: ``init``, ``intermediate_size``, ``calibration_tokens``, ``seq_len``, ``seed``.
        calibration: training documents to calibrate the experts' aggregation on (from-teacher inits).
        calibration_name: how to name them.
        work_dir: where merge may write the student (a folder created and removed here).
        device: where the teacher runs during calibration.
        teacher_tokenizer: compared with a checkpoint student's tokenizer.
        revision / token / offline: Hub access for ``teacher``.
        is_main / barrier: in a multi-process run only the main process writes; the others wait.
        progress: merge's progress callback.

    Returns:
        ``(model, info)``.

    Raises:
        UnsupportedArchitectureError: ``NOT_DENSE`` for a checkpoint student that is an MoE;
            ``NO_DENSE_COUNTERPART`` for a teacher family without a dense architecture.
        ModelLoadError: ``TOKENIZER_MISMATCH`` for a checkpoint student with another tokenizer.
    """
    if options.init_from_teacher:
        model, description, summary = _from_teacher(
            teacher,
            options,
            calibration=calibration,
            calibration_name=calibration_name,
            work_dir=work_dir,
            device=device,
            revision=revision,
            token=token,
            offline=offline,
            is_main=is_main,
            barrier=barrier,
            progress=progress,
        )
    elif options.init == "random":
        model, description, summary = _random(checkpoint, options)
    else:
        model, description, summary = _from_checkpoint(teacher, options, teacher_tokenizer)
    model.train()
    config = model.config
    info = StudentInit(
        init=options.init,
        description=description,
        model_type=str(config.model_type),
        architecture=type(model).__name__,
        intermediate_size=getattr(config, "intermediate_size", None),
        params=count_params(model),
        merge=summary,
    )
    return model, info


#: How each from-teacher init builds a layer's FFN, for the student's description.
_FROM_TEACHER = {
    "concat": "the most used experts' neurons concatenated",
    "top1": "each layer's most used expert",
    "average": "the experts averaged after neuron alignment",
}


def _from_teacher(
    teacher: str,
    options: DistillOptions,
    *,
    calibration: Sequence[Document],
    calibration_name: str,
    work_dir: Path,
    device: str,
    revision: str | None,
    token: str | bool | None,
    offline: bool | None,
    is_main: bool,
    barrier: Callable[[], None],
    progress: Progress | None,
) -> tuple[Any, str, dict[str, Any]]:
    """The student as ``merge --to-dense`` makes it from the teacher (the main process merges, all load it).

    Returns:
        ``(model, description, merge summary)``.
    """
    from moetool.modeling import load_weights, open_checkpoint

    folder = work_dir / INIT_FOLDER
    summary: dict[str, Any] = {}
    if is_main:
        summary = _merge_to_dense(
            teacher,
            folder,
            options,
            calibration=calibration,
            calibration_name=calibration_name,
            device=device,
            revision=revision,
            token=token,
            offline=offline,
            progress=progress,
        )
        gc.collect()
    barrier()
    model = load_weights(open_checkpoint(str(folder)), device="cpu", dtype="float32")
    barrier()
    if is_main:
        shutil.rmtree(folder, ignore_errors=True)
    description = (
        f"initialised from the teacher: attention, norms and embeddings copied, each FFN {_FROM_TEACHER[options.init]} "
        f"(moetool merge --to-dense --dense-strategy {options.init})"
    )
    return model, description, summary


def _merge_to_dense(
    teacher: str,
    folder: Path,
    options: DistillOptions,
    *,
    calibration: Sequence[Document],
    calibration_name: str,
    device: str,
    revision: str | None,
    token: str | bool | None,
    offline: bool | None,
    progress: Progress | None,
) -> dict[str, Any]:
    """Run ``merge --to-dense`` on the teacher into ``folder``; returns its summary for the card."""
    from moetool.data import DatasetSpec
    from moetool.merge import MergeOptions, merge

    merge_options = MergeOptions(
        to_dense=True,
        dense_strategy=options.init,
        intermediate_size=options.intermediate_size if options.init == "concat" else None,
        seed=options.seed,
        evaluate=False,
        device=device,
        dtype="auto",
    )
    text = DatasetSpec.of_documents(
        calibration,
        calibration_name,
        max_tokens=options.calibration_tokens,
        seq_len=options.seq_len,
        batch_size=options.eval_batch_size,
    )
    result = merge(
        teacher,
        folder,
        merge_options,
        calibration=text,
        revision=revision,
        token=token,
        offline=offline,
        overwrite=True,
        command=f"moetool merge {teacher} --to-dense --dense-strategy {options.init} (distill --init)",
        progress=progress,
    )
    return _describe_merge(result)


def _random(checkpoint: Checkpoint, options: DistillOptions) -> tuple[Any, str, dict[str, Any]]:
    """A randomly initialised student of the teacher's dense architecture (seeded)."""
    import torch
    from transformers import AutoModelForCausalLM

    width = options.intermediate_size or default_width(checkpoint)
    config = dense_student_config(checkpoint, width)
    torch.manual_seed(options.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model, "randomly initialised (the teacher's dense architecture, transformers' initialisation)", {}


def _from_checkpoint(teacher: str, options: DistillOptions, teacher_tokenizer: Any) -> tuple[Any, str, dict[str, Any]]:
    """The dense checkpoint ``options.init`` as the student (refused if it is an MoE or has another tokenizer)."""
    from moetool.arch.registry import family_for_config
    from moetool.modeling import check_same_tokenizer, load_tokenizer, load_weights, open_checkpoint

    student_checkpoint = open_checkpoint(options.init)
    spec = family_for_config(student_checkpoint.config)
    if spec.is_moe:
        raise UnsupportedArchitectureError(
            f"--init {options.init} is a Mixture-of-Experts ({spec.name}); distill trains a dense student",
            hint="pass a dense checkpoint, or one of concat, top1, average, random",
            code="NOT_DENSE",
        )
    check_same_tokenizer(teacher_tokenizer, load_tokenizer(student_checkpoint), names=(teacher, options.init))
    model = load_weights(student_checkpoint, device="cpu", dtype="float32")
    return model, f"initialised from the dense checkpoint {options.init}", {}
