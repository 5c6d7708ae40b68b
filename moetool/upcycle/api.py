"""``upcycle()``: a dense checkpoint in, a verified Mixture-of-Experts checkpoint out.

The steps, each in its own module: open the source (headers only), build and check the plan
(:mod:`~moetool.upcycle.plan`), optionally compute k-means routers (the only step that loads the dense
model), then inside a staging folder stream every output tensor (:mod:`~moetool.upcycle.tensors`)
into planned shards (:class:`~moetool.io.shards.ShardWriter` with the plan), write config.json,
copy tokenizer files, verify (:mod:`~moetool.upcycle.verify`), write the model card, and publish.
Any failure, Ctrl-C or failed check leaves nothing at the output path.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moetool.data import DatasetSpec
from moetool.errors import CheckpointError, UsageError
from moetool.progress import BYTES, Progress, report
from moetool.upcycle.plan import UpcycleOptions, UpcyclePlan, build_plan
from moetool.upcycle.verify import Verification

SCHEMA_VERSION = 1


@dataclass
class UpcycleResult:
    """What :func:`upcycle` did (``--json`` prints :meth:`to_json`).

    Attributes:
        plan: the plan that was followed.
        output: the output folder (``None`` for a dry run).
        dry_run: whether anything was written.
        files: the files written (weights, index, config, tokenizer, README.md).
        bytes_written: size of the weight files on disk.
        verification: the checks, when ``verify`` was on.
        timings: seconds per step.
        copied_aux: tokenizer and generation files copied from the source.
    """

    plan: UpcyclePlan
    output: str | None
    dry_run: bool
    files: list[str] = field(default_factory=list)
    bytes_written: int | None = None
    verification: Verification | None = None
    timings: dict[str, float] = field(default_factory=dict)
    copied_aux: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The result as one JSON-able document (``schema_version`` 1)."""
        return {
            "schema_version": SCHEMA_VERSION,
            "source": self.plan.source_name,
            "source_revision": self.plan.source_revision,
            "output": self.output,
            "dry_run": self.dry_run,
            "plan": self.plan.describe(),
            "predicted_bytes": self.plan.predicted_bytes,
            "bytes_written": self.bytes_written,
            "files": self.files,
            "verification": self.verification.to_json() if self.verification is not None else None,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "warnings": list(self.plan.warnings),
        }


def _open_source(source: Any, *, revision: str | None, token: str | bool | None, offline: bool | None) -> Any:
    from moetool.io.checkpoint import Checkpoint
    from moetool.io.source import open_model

    checkpoint = (
        source
        if isinstance(source, Checkpoint)
        else open_model(str(source), revision=revision, token=token, offline=offline, need_weights=True)
    )
    if checkpoint.root is None or not checkpoint.shards:
        raise CheckpointError(
            f"{checkpoint.name} has no safetensors weights to upcycle",
            hint="pass a checkpoint folder with its *.safetensors files",
            code="WEIGHTS_MISSING",
        )
    return checkpoint


def _kmeans(
    plan: UpcyclePlan, checkpoint: Any, data: DatasetSpec, device: str, on_status: Callable[[str], None]
) -> dict:
    from moetool.runner.open import open_runner
    from moetool.upcycle.router_init import kmeans_routers

    documents = data.load()
    on_status(f"opening {checkpoint.name} for k-means router init (one layer at a time)")
    opened = open_runner(checkpoint, device=device, dtype="float32")
    tokenizer, model = opened.tokenizer, opened.runner
    on_status("collecting hidden states for k-means")
    batches = data.batches(tokenizer, documents)
    try:
        # max_tokens None: every token of the text.
        return kmeans_routers(plan, batches, model=model, max_tokens=data.max_tokens or sys.maxsize)
    finally:
        del model


def upcycle(
    source: Any,
    out: Path | str | None,
    options: UpcycleOptions,
    *,
    dry_run: bool = False,
    verify: bool = True,
    full_check: bool | None = None,
    overwrite: bool = False,
    allow_nonfinite: bool = False,
    kmeans_data: DatasetSpec | None = None,
    device: str = "auto",
    revision: str | None = None,
    token: str | bool | None = None,
    offline: bool | None = None,
    command: str | Sequence[str] | None = None,
    progress: Progress | None = None,
) -> UpcycleResult:
    """Upcycle a dense checkpoint into a Mixture-of-Experts checkpoint.

    Args:
        source: a local folder, a Hub repo id, or an opened :class:`~moetool.io.checkpoint.Checkpoint`.
        out: the output folder (may be ``None`` for a dry run).
        options: experts, top-k, granularity, shared experts, MoE layers, target, router init,
            symmetry breaking, dtype, shard size.
        dry_run: plan only; nothing is read beyond headers and nothing is written.
        verify: check the output against the dense model before publishing it.
        full_check: the transformers logits check: ``None`` when the models fit in memory.
        overwrite: replace an existing output folder.
        allow_nonfinite: process an input holding NaN/Inf (refused otherwise) and publish such an output.
        kmeans_data: the text for ``router_init="kmeans"`` (its ``max_tokens`` tokens are clustered).
        device: where the k-means pass runs the dense model.
        revision / token / offline: Hub access for a repo id source.
        command: the command line, recorded in the model card.
        progress: reports each step as a status line and ``writing`` in bytes (:mod:`moetool.progress`).

    Returns:
        What was planned, written and checked.

    Raises:
        MoetoolError: the refusals of :func:`~moetool.upcycle.plan.build_plan`, output path problems
            (:func:`~moetool.io.writer.check_output_path`), ``VERIFY_FAILED`` when the check fails.
    """
    from moetool.io.writer import check_disk_space, check_output_path

    def status(message: str) -> None:
        report(progress, message)

    _precheck(source, revision=revision, token=token, offline=offline)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    _check_data_options(options, kmeans_data)
    checkpoint = _open_checked(
        source, dry_run=dry_run, allow_nonfinite=allow_nonfinite, revision=revision, token=token, offline=offline
    )
    plan = build_plan(checkpoint, options)
    if out is not None:
        check_output_path(Path(out), [checkpoint.root], overwrite=overwrite)
    timings["plan"] = time.perf_counter() - started
    if dry_run:
        timings["total"] = time.perf_counter() - started
        return UpcycleResult(plan=plan, output=None if out is None else str(out), dry_run=True, timings=timings)
    if out is None:
        raise UsageError("no output folder given", hint="pass -o OUT")
    out = Path(out)
    check_disk_space(out, plan.predicted_bytes, what="the upcycled model")

    routers: dict = {}
    if options.router_init == "kmeans":
        step = time.perf_counter()
        assert kmeans_data is not None
        routers = _kmeans(plan, checkpoint, kmeans_data, device, status)
        timings["kmeans"] = time.perf_counter() - step

    result = UpcycleResult(plan=plan, output=str(out), dry_run=False, timings=timings)
    _write(
        result,
        checkpoint,
        out,
        routers,
        verify=verify,
        full_check=full_check,
        overwrite=overwrite,
        allow_nonfinite=allow_nonfinite,
        command=command,
        progress=progress,
        status=status,
    )
    timings["total"] = time.perf_counter() - started
    return result


def _precheck(source: Any, *, revision: str | None, token: str | bool | None, offline: bool | None) -> None:
    """Headers only, no torch: a malformed input is refused before anything is downloaded or read."""
    from moetool.io.checkpoint import Checkpoint
    from moetool.validate import preflight

    if not isinstance(source, Checkpoint):
        preflight(str(source), revision=revision, token=token, offline=offline, float_weights=True)


def _check_data_options(options: UpcycleOptions, kmeans_data: DatasetSpec | None) -> None:
    """``--dataset`` goes with ``--router-init kmeans``, and only with it."""
    if options.router_init == "kmeans" and kmeans_data is None:
        raise UsageError("--router-init kmeans needs --dataset", hint="pass the text to cluster with --dataset")
    if options.router_init != "kmeans" and kmeans_data is not None:
        raise UsageError("--dataset is only used with --router-init kmeans", hint="drop --dataset or add it")


def _open_checked(
    source: Any,
    *,
    dry_run: bool,
    allow_nonfinite: bool,
    revision: str | None,
    token: str | bool | None,
    offline: bool | None,
) -> Any:
    """Open the source and check it (a dry run reads headers only, and stays free of torch)."""
    from moetool.validate import check_input

    checkpoint = _open_source(source, revision=revision, token=token, offline=offline)
    deep = not dry_run
    check_input(
        checkpoint, float_weights=True, scan_nonfinite=deep, transformers_config=deep, allow_nonfinite=allow_nonfinite
    )
    return checkpoint


def _write(
    result: UpcycleResult,
    checkpoint: Any,
    out: Path,
    routers: dict,
    *,
    verify: bool,
    full_check: bool | None,
    overwrite: bool,
    allow_nonfinite: bool,
    command: str | Sequence[str] | None,
    progress: Progress | None,
    status: Callable[[str], None],
) -> None:
    """Write the tensors, config and aux files into a staging folder, verify, write the card, publish."""
    from moetool.io.model_card import write_model_card
    from moetool.io.shards import ShardWriter
    from moetool.io.writer import copy_aux_files, staged_output, write_json
    from moetool.upcycle.tensors import iter_output_tensors
    from moetool.upcycle.verify import verify as run_verify

    plan, timings = result.plan, result.timings
    with staged_output(out, inputs=[checkpoint.root], overwrite=overwrite, allow_nonfinite=allow_nonfinite) as staging:
        step = time.perf_counter()
        status(f"writing {plan.predicted_bytes / 1e9:.2f} GB")
        shard_size = plan.options.max_shard_size
        on_bytes = None
        if progress is not None:
            total = plan.tensor_bytes

            def on_bytes(n: int) -> None:
                progress("writing", n, total, unit=BYTES)

        with ShardWriter(staging, plan.entries, max_shard_size=shard_size, on_bytes=on_bytes) as writer:
            for name, tensor in iter_output_tensors(plan, checkpoint, routers=routers):
                writer.add(name, tensor)
        write_json(staging / "config.json", plan.config)
        result.copied_aux = copy_aux_files(checkpoint.root, staging)
        timings["write"] = time.perf_counter() - step
        if verify:
            step = time.perf_counter()
            status("verifying against the dense model")
            result.verification = run_verify(plan, checkpoint, staging, full=full_check)
            timings["verify"] = time.perf_counter() - step
        write_model_card(staging, **_card(plan, result, command))
        result.files = sorted(p.name for p in staging.iterdir())
        result.bytes_written = sum(p.stat().st_size for p in staging.glob("*.safetensors"))
        status("publishing")


def _card(plan: UpcyclePlan, result: UpcycleResult, command: str | Sequence[str] | None) -> dict[str, Any]:
    opts = plan.options
    summary = (
        f"Upcycled from the dense {plan.source_family.name} model {plan.source_name} into a "
        f"{plan.target_family.name} Mixture-of-Experts model by moetool: each of {len(plan.moe_layers)} MoE "
        f"layers holds {opts.num_experts} copies of the dense MLP"
        + (f", each split into {opts.granularity} fine-grained experts" if opts.granularity > 1 else "")
        + f" ({plan.num_experts} experts, top-{plan.top_k})"
        + (f", plus {opts.shared_experts} shared copies" if opts.shared_experts else "")
        + ". "
        + (
            "At initialisation it computes the same function as the dense model."
            if plan.exact
            else "Symmetry breaking (noise / re-initialised neurons) makes it differ from the dense model."
        )
    )
    results: dict[str, Any] = {}
    if result.verification is not None:
        results.update(result.verification.summary())
    else:
        results["verification"] = "not run (--no-verify)"
    results["total parameters"] = plan.total_params
    results["active parameters per token"] = plan.active_params
    options = {
        "num_experts (copies)": opts.num_experts,
        "top_k (copies)": opts.top_k,
        "granularity": opts.granularity,
        "experts written": plan.num_experts,
        "top_k written": plan.top_k,
        "shared_experts": opts.shared_experts,
        "moe_layers": opts.moe_layers,
        "target": plan.target_family.name,
        **{f"symmetry: {k}": v for k, v in plan.symmetry_breaking().items()},
        "dtype": plan.out_dtype,
    }
    return {
        "base_models": [plan.source_name],
        "relation": "upcycle",
        "command": command if command is not None else "moetool upcycle (library call)",
        "options": options,
        "revision": plan.source_revision,
        "tags": ("upcycled", plan.config["model_type"]),
        "summary": summary,
        "results": results,
    }
