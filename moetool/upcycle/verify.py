"""Checking an upcycled model against its dense source before it is published.

Three checks, all inside the staging folder:

* ``files``: the written checkpoint opens with moetool's validating reader and holds exactly the
  planned tensors (names, dtypes, shapes). Headers only.
* ``layers`` (streamed, any model size): for every MoE layer, random inputs go through the dense MLP
  (source tensors, rounded to the output dtype) and through the MoE block computed from the *written*
  tensors with the target family's own rule (softmax over all experts, top-k, renormalise per the
  written config, shared expert behind its sigmoid gate, routed scaling factor). Every expert is also
  run on its own against the dense shard it must equal, so an expert no token happened to choose is
  checked too. One layer's tensors are in memory at a time.
* ``logits`` (when the models fit in memory: the larger of the two in float32 under 40% of the
  available memory): the dense model and the upcycled one are loaded, one after the other, with stock
  transformers ``AutoModelForCausalLM`` (float32; the dense one first rounded to the output dtype),
  the load must report no missing, unexpected or mis-shaped tensors, and the logits on random token
  ids must agree (float32: max abs diff <= 1e-4).

With ``--noise`` or ``--reinit-ratio`` the experts differ from the dense MLP on purpose: the numbers
are still measured and reported, but only the file check, finiteness and a clean load can fail.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moetool.errors import VerificationError
from moetool.upcycle.symmetry import generator

if TYPE_CHECKING:
    import torch

    from moetool.io.checkpoint import Checkpoint
    from moetool.upcycle.plan import UpcyclePlan

# Relative tolerance of the layer check by output dtype (float32 differs only by summation order).
LAYER_RTOL = {"float32": 1e-5, "bfloat16": 2e-2, "float16": 5e-3}
LOGITS_ATOL = 1e-4
LOGITS_RTOL = {"float32": 0.0, "bfloat16": 2e-2, "float16": 5e-3}
VERIFY_TOKENS = 16
FULL_CHECK_MEMORY_FRACTION = 0.4


@dataclass
class CheckResult:
    """One check: what was compared, the largest difference, the tolerance, and the verdict.

    ``passed`` is ``None`` for a figure that is reported but cannot fail (symmetry breaking).
    """

    name: str
    passed: bool | None
    max_abs_diff: float | None = None
    tolerance: float | None = None
    detail: str = ""
    per_layer: dict[int, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "passed": self.passed,
            "max_abs_diff": self.max_abs_diff,
            "tolerance": self.tolerance,
            "detail": self.detail,
            "per_layer": {str(k): v for k, v in self.per_layer.items()},
        }


@dataclass
class Verification:
    """All checks of one run; ``status`` is ``passed``, ``failed`` or ``not_exact_by_design``."""

    status: str
    checks: list[CheckResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "checks": [c.to_json() for c in self.checks], "notes": self.notes}

    def summary(self) -> dict[str, Any]:
        """Check name -> max abs diff (the model card's results table)."""
        out: dict[str, Any] = {"verification": self.status}
        for check in self.checks:
            if check.max_abs_diff is not None:
                out[f"{check.name} max abs diff"] = f"{check.max_abs_diff:.3g} (tolerance {check.tolerance:.3g})"
        return out


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation (``MemAvailable``), when the system says."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def full_check_fits(plan: UpcyclePlan) -> tuple[bool, str]:
    """Whether both models, loaded one after the other in float32, fit the memory budget."""
    need = 4 * max(plan.source_params, plan.total_params)
    avail = available_memory()
    if avail is None:
        return False, "available memory unknown"
    budget = int(FULL_CHECK_MEMORY_FRACTION * avail)
    if need > budget:
        return False, f"the float32 model needs {need / 1e9:.1f} GB, over 40% of the {avail / 1e9:.1f} GB available"
    return True, ""


def _act(plan: UpcyclePlan) -> Any:
    """The MLP activation; the common ones without importing transformers (seconds of start-up)."""
    import functools

    import torch.nn.functional as F

    name = plan.config.get("hidden_act", "silu")
    common = {
        "silu": F.silu,
        "swish": F.silu,
        "relu": F.relu,
        "gelu": F.gelu,
        "gelu_pytorch_tanh": functools.partial(F.gelu, approximate="tanh"),
    }
    if name in common:
        return common[name]
    from transformers.activations import ACT2FN

    return ACT2FN[name]


def _mlp(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, act: Any) -> torch.Tensor:
    return (act(x @ gate.T) * (x @ up.T)) @ down.T


def check_files(plan: UpcyclePlan, folder: Path) -> tuple[CheckResult, Checkpoint]:
    """Open the written checkpoint with the validating reader and compare it with the plan."""
    from moetool.io.checkpoint import Checkpoint

    written = Checkpoint.open(folder, name=str(folder))
    problems = []
    for entry in plan.entries:
        info = written.tensors.get(entry.name)
        if info is None:
            problems.append(f"{entry.name} missing")
        elif info.dtype != entry.dtype or info.shape != entry.shape:
            problems.append(f"{entry.name} is {info.dtype} {list(info.shape)}")
    extra = set(written.tensors) - {entry.name for entry in plan.entries}
    if extra:
        problems.append(f"{len(extra)} tensor(s) not in the plan, e.g. {sorted(extra)[0]}")
    detail = "; ".join(problems[:3]) or f"{len(plan.entries)} tensors in {len(written.shards)} file(s)"
    return CheckResult("files", not problems, detail=detail), written


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (NaN-safe, and a memcmp-speed loop rather than an elementwise float compare)."""
    import numpy as np
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    as_bytes = [t.contiguous().reshape(-1).view(torch.uint8).numpy() for t in (a, b)]
    return bool(np.array_equal(*as_bytes))


def _expected_shards(plan: UpcyclePlan, dense: list[torch.Tensor], dtype: torch.dtype) -> dict[tuple[int, int], Any]:
    """What every routed expert of an exact plan must hold, re-derived from the dense tensors.

    Keyed by (role, shard): gate/up shards are row blocks, down shards column blocks scaled by the
    plan's routed factor (in float32, rounded once to the output dtype).
    """
    width = plan.expert_width
    out = {}
    for shard in range(plan.options.granularity):
        rows = slice(shard * width, (shard + 1) * width)
        out[(0, shard)] = dense[0][rows].to(dtype).contiguous()
        out[(1, shard)] = dense[1][rows].to(dtype).contiguous()
        scale = plan.routed_down_scale
        down = dense[2][:, rows]
        out[(2, shard)] = ((down.float() * scale) if scale != 1.0 else down).to(dtype).contiguous()
    return out


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch ops on one intra-op thread, restoring the setting afterwards.

    The layer check is a few thousand small, memory-bound ops (16 tokens): a second thread gains
    little on a quiet machine, and on a busy one every OpenMP hand-off can wait a scheduler time slice
    (measured here: 1.8 s on one thread against 9.5 s on two, for a 0.5B model into 8 experts).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def check_layers(
    plan: UpcyclePlan, source: Checkpoint, written: Checkpoint, *, tokens: int = VERIFY_TOKENS
) -> list[CheckResult]:
    """The streamed per-layer checks: every expert against its dense shard, and the MoE block as a whole.

    Experts (exact plans): each written expert tensor must equal, bit for bit, the dense shard the plan
    says it holds; one that does not is run on the random inputs and compared with a dtype tolerance.
    Block: the MoE layer's output from the written router, renormalisation, scaling and shared expert
    against the dense MLP. Expert outputs come from the dense shards when every expert was shown
    identical to them (the same numbers, computed once per shard instead of once per copy), else from
    the written experts one by one.
    """
    import torch

    block = _block_shape(plan)
    tally = _Tally()
    with torch.no_grad(), _one_thread():
        for layer in plan.moe_layers:
            _check_layer(plan, source, written, layer, block, tally, tokens)
    return _layer_results(plan, tally, tokens)


@dataclass
class _BlockShape:
    """How the target's MoE block computes: its activation, routing rule and tensor templates."""

    act: Any
    renormalize: bool
    scaling: float
    routed_t: list[Any]
    shared_t: list[Any]
    shared_gate: str | None


@dataclass
class _Tally:
    """The figures of the layer checks, accumulated over the layers."""

    block_diff: float = 0.0
    expert_diff: float = 0.0
    block_tol: float = 0.0
    expert_tol: float = 0.0
    identical: int = 0
    mismatched: int = 0
    finite: bool = True
    per_layer: dict[int, float] = field(default_factory=dict)


def _block_shape(plan: UpcyclePlan) -> _BlockShape:
    """Read the target family's routing rule and templates for this plan's config."""
    from moetool.arch.dims import template_applies

    tgt = plan.target_family
    routing = tgt.routing
    renormalize = routing.renormalize_default
    if routing.renormalize_key:
        renormalize = bool(plan.config.get(routing.renormalize_key, routing.renormalize_default))
    scaling = float(plan.config.get(routing.scaling_key, 1.0)) if routing.scaling_key else 1.0
    values = {**plan.config, "E": plan.num_experts}
    shared_gate = tgt.shared_expert_gate
    return _BlockShape(
        act=_act(plan),
        renormalize=renormalize,
        scaling=scaling,
        routed_t=[t for t in tgt.routed_experts if template_applies(t, values)],
        shared_t=[t for t in tgt.shared_experts if t.name != shared_gate],
        shared_gate=shared_gate,
    )


def _read_written(plan: UpcyclePlan, written: Checkpoint, layer: int, block: _BlockShape) -> dict[str, torch.Tensor]:
    """The layer's written router, experts and shared expert, keyed ``router``, ``e{E}.{role}``, ``s.{role}``."""
    prefix_t = plan.target_family.layer_prefix.format(L=layer)
    names = {
        "router": prefix_t + plan.target_family.router[0].name,
        **{
            f"e{e}.{role}": prefix_t + t.name.replace("{E}", str(e))
            for role, t in enumerate(block.routed_t)
            for e in range(plan.num_experts)
        },
        **{f"s.{role}": prefix_t + t.name for role, t in enumerate(block.shared_t)},
    }
    if block.shared_gate:
        names["s.gate"] = prefix_t + block.shared_gate
    # iter_tensors groups by shard: map back by name, not by order.
    by_name = dict(written.iter_tensors(names.values()))
    return {key: by_name[name] for key, name in names.items()}


def _check_layer(
    plan: UpcyclePlan,
    source: Checkpoint,
    written: Checkpoint,
    layer: int,
    block: _BlockShape,
    tally: _Tally,
    tokens: int,
) -> None:
    """Check one MoE layer's experts and block against the dense MLP on random inputs; add to ``tally``."""
    import torch

    src_spec = plan.source_family
    act = block.act
    got = _read_written(plan, written, layer, block)
    dtype = got["e0.0"].dtype
    dtype_name = str(dtype).removeprefix("torch.")
    prefix_s = src_spec.layer_prefix.format(L=layer)
    raw = [source.read_tensor(prefix_s + t.name) for t in src_spec.dense_mlp[:3]]
    dense = [t.to(dtype).float() for t in raw]
    x = torch.randn(tokens, plan.hidden_size, generator=generator(plan.options.seed, "verify", layer))
    reference = _mlp(x, *dense, act)
    tol = _tol(reference, dtype_name)

    expected = _expected_shards(plan, raw, dtype) if plan.exact else {}
    shard_out = _shard_outputs(plan, x, dense, expected, act) if plan.exact else {}
    outputs = _expert_outputs(plan, x, got, expected, shard_out, act, tally, dtype_name)
    out = _block_output(plan, x, got, outputs, block, reference)
    tally.finite &= bool(torch.isfinite(out).all())
    diff = float((out - reference).abs().max())
    tally.per_layer[layer] = diff
    tally.block_diff = max(tally.block_diff, diff) if diff == diff else math.inf
    tally.block_tol = max(tally.block_tol, tol)


def _shard_outputs(
    plan: UpcyclePlan, x: torch.Tensor, dense: list[torch.Tensor], expected: dict[tuple[int, int], Any], act: Any
) -> dict[int, torch.Tensor]:
    """Each dense shard's MLP output on ``x`` (exact plans): what every copy of that shard must give."""
    shard_out = {}
    width = plan.expert_width
    for j in range(plan.options.granularity):
        rows = slice(j * width, (j + 1) * width)
        # gate/up shards hold exactly the rounded dense rows: slice the float copy we have.
        down = expected[(2, j)].float() if plan.routed_down_scale != 1.0 else dense[2][:, rows]
        shard_out[j] = _mlp(x, dense[0][rows], dense[1][rows], down, act)
    return shard_out


def _expert_outputs(
    plan: UpcyclePlan,
    x: torch.Tensor,
    got: dict[str, torch.Tensor],
    expected: dict[tuple[int, int], Any],
    shard_out: dict[int, torch.Tensor],
    act: Any,
    tally: _Tally,
    dtype_name: str,
) -> dict[int, torch.Tensor]:
    """Every expert's output on ``x``; experts that differ from their shard are run and compared."""
    import torch

    granularity = plan.options.granularity
    outputs: dict[int, torch.Tensor] = {}
    for e in range(plan.num_experts):
        j = e % granularity
        if plan.exact and all(_same_bytes(got[f"e{e}.{r}"], expected[(r, j)]) for r in range(3)):
            tally.identical += 1
            continue
        output = _mlp(x, *(got[f"e{e}.{r}"].float() for r in range(3)), act)
        outputs[e] = output
        tally.finite &= bool(torch.isfinite(output).all())
        if plan.exact:
            tally.mismatched += 1
            diff = float((output - shard_out[j]).abs().max())
            tally.expert_diff = max(tally.expert_diff, diff) if diff == diff else math.inf  # NaN fails
            tally.expert_tol = max(tally.expert_tol, _tol(shard_out[j], dtype_name))

    # Experts shown bit-identical to their shard have that shard's output: computed once per shard.
    for e in range(plan.num_experts):
        outputs.setdefault(e, shard_out.get(e % granularity))
    return outputs


def _block_output(
    plan: UpcyclePlan,
    x: torch.Tensor,
    got: dict[str, torch.Tensor],
    outputs: dict[int, torch.Tensor],
    block: _BlockShape,
    reference: torch.Tensor,
) -> torch.Tensor:
    """The MoE block's output: the written router's top-k mix of the experts, scaled, plus the shared expert."""
    import torch

    probs = torch.softmax(x @ got["router"].float().T, dim=-1)
    top_w, top_i = torch.topk(probs, plan.top_k, dim=-1)
    if block.renormalize:
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    out = torch.zeros_like(reference)
    for e in top_i.unique().tolist():
        rows, slot = (top_i == e).nonzero(as_tuple=True)
        out[rows] += top_w[rows, slot, None] * outputs[e][rows]
    out = out * block.scaling
    if block.shared_t:
        shared = _mlp(x, *(got[f"s.{r}"].float() for r in range(3)), block.act)
        if block.shared_gate:
            shared = torch.sigmoid(x @ got["s.gate"].float().T) * shared
        out = out + shared
    return out


def _layer_results(plan: UpcyclePlan, tally: _Tally, tokens: int) -> list[CheckResult]:
    """The ``layers`` and ``experts`` checks from the tally."""
    if not tally.finite:
        return [
            CheckResult(
                "layers", False, tally.block_diff, tally.block_tol, "non-finite outputs from the written experts"
            )
        ]
    detail = f"{len(plan.moe_layers)} MoE layers, {tokens} random inputs each"
    results = [
        CheckResult(
            "layers",
            (tally.block_diff <= tally.block_tol) if plan.exact else None,
            tally.block_diff,
            tally.block_tol,
            detail,
            tally.per_layer,
        )
    ]
    total = plan.num_experts * len(plan.moe_layers)
    if plan.exact:
        passed = tally.expert_diff <= tally.expert_tol
        detail = f"{tally.identical} of {total} experts bit-identical to their dense shard"
        if tally.mismatched:
            detail += f"; {tally.mismatched} differ (compared on random inputs)"
        results.append(
            CheckResult("experts", passed, tally.expert_diff, tally.expert_tol if tally.mismatched else 0.0, detail)
        )
    else:
        results.append(CheckResult("experts", None, None, None, f"{total} experts differ from the dense MLP by design"))
    return results


def _tol(reference: torch.Tensor, dtype: str) -> float:
    scale = max(1e-3, float(reference.abs().max()))
    return LAYER_RTOL.get(dtype, 2e-2) * scale + 1e-7


def check_logits(plan: UpcyclePlan, source: Checkpoint, folder: Path, *, length: int = VERIFY_TOKENS) -> CheckResult:
    """Load both models with stock transformers, one after the other, and compare their logits."""
    import torch
    from transformers import AutoModelForCausalLM

    from moetool.modeling import quiet_transformers

    vocab = int(plan.config["vocab_size"])
    ids = torch.randint(vocab, (2, length), generator=generator(plan.options.seed, "verify-logits"))
    out_dtype = getattr(torch, plan.out_dtype)
    common = {"local_files_only": True, "trust_remote_code": False, "use_safetensors": True}
    with quiet_transformers(), torch.no_grad(), warnings.catch_warnings():
        # A Qwen2-MoE written without shared experts has a zero-width shared expert, whose random
        # initialisation torch reports as a no-op before the real (empty) weights are loaded.
        warnings.filterwarnings("ignore", message="Initializing zero-element tensors")
        dense = AutoModelForCausalLM.from_pretrained(str(source.root), dtype=out_dtype, **common).float().eval()
        reference = dense(ids).logits
        del dense
        gc.collect()
        moe, info = AutoModelForCausalLM.from_pretrained(
            str(folder), dtype=torch.float32, output_loading_info=True, **common
        )
        problems = [
            f"{kind.replace('_keys', '')} {sorted(map(str, info[kind]))[:3]}"
            for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")
            if info.get(kind)
        ]
        logits = moe.eval()(ids).logits
        del moe
        gc.collect()
    diff = float((logits - reference).abs().max())
    tol = LOGITS_ATOL + LOGITS_RTOL.get(plan.out_dtype, 2e-2) * float(reference.abs().max())
    if problems:
        return CheckResult("logits", False, diff, tol, "transformers load: " + "; ".join(problems))
    if not math.isfinite(diff):
        return CheckResult("logits", False, diff, tol, "non-finite logits")
    detail = f"stock transformers, float32, {ids.numel()} random tokens"
    return CheckResult("logits", (diff <= tol) if plan.exact else None, diff, tol, detail)


def verify(plan: UpcyclePlan, source: Checkpoint, folder: Path, *, full: bool | None = None) -> Verification:
    """Run the checks on a written (staged) output; raise when one fails.

    Args:
        plan: the plan the output was written from.
        source: the dense checkpoint.
        folder: the output (staging) folder with weights and config.json.
        full: run the transformers logits check: ``None`` when it fits in memory, or always / never.

    Returns:
        The checks and their figures.

    Raises:
        VerificationError: a check failed (the message names it and gives the figures).
    """
    result = Verification(status="passed")
    files, written = check_files(plan, folder)
    result.checks.append(files)
    if files.passed:
        result.checks.extend(check_layers(plan, source, written))
        run_full, why = (full, "") if full is not None else full_check_fits(plan)
        if run_full:
            result.checks.append(check_logits(plan, source, folder))
        else:
            result.notes.append(f"full-model logits check skipped: {why or 'not requested'}")
    if not plan.exact:
        result.notes.append(
            "the experts differ from the dense MLP by design (--noise / --reinit-ratio): differences are "
            "reported, not checked"
        )
    failed = [c for c in result.checks if c.passed is False]
    if failed:
        result.status = "failed"
        first = failed[0]
        figures = (
            f" (max abs diff {first.max_abs_diff:.3g} > tolerance {first.tolerance:.3g})"
            if first.max_abs_diff is not None and first.tolerance is not None
            else ""
        )
        raise VerificationError(
            f"verification failed: {first.name} check{figures}: {first.detail}",
            hint="nothing was written; rerun with MOETOOL_DEBUG=1 and report this as a bug",
        )
    if not plan.exact:
        result.status = "not_exact_by_design"
    return result
