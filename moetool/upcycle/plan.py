"""The upcycling plan: every decision made and checked before a byte of weights is read.

:func:`build_plan` takes the opened dense checkpoint (config and headers only) and the options, and
either refuses with one clear error or returns a frozen :class:`UpcyclePlan`: the source and target
families, the expert arithmetic (copies, granularity, shared experts, scalings that keep the model
exact), the MoE layer set, the target config.json, and the list of output tensors (name, dtype,
shape, and how each is made from the source) with the predicted file sizes. ``--dry-run`` prints
:meth:`UpcyclePlan.describe`; the streaming conversion (:mod:`moetool.upcycle.tensors`) follows the
plan tensor for tensor, and the writer checks it does.

Units: ``num_experts`` (E) and ``top_k`` (K) count copies of the dense FFN. With granularity G each
copy is split along the intermediate dimension into G fine-grained experts of width D/G, so the
written config holds E*G experts and top-k K*G.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from moetool.arch.dims import Dims, eval_dim, resolve_dims, template_applies
from moetool.arch.plan import planned_tensors
from moetool.arch.registry import family_for_config, get_family, require_capability
from moetool.arch.spec import ExpertLayout, FamilySpec, Routing, T
from moetool.errors import CheckpointError, MoetoolError, ShapeMismatchError, UnsupportedArchitectureError, UsageError
from moetool.io.checkpoint import Checkpoint
from moetool.io.dtypes import FLOAT_DTYPES
from moetool.io.shards import PlannedEntry, ShardLayout, plan_shards
from moetool.io.sizes import DEFAULT_MAX_SHARD_SIZE
from moetool.upcycle.config import target_config, upcyclable_families

ROUTER_INITS = ("random", "zeros", "kmeans")
DTYPES = ("auto", "float32", "bfloat16", "float16")
_DTYPE_NAMES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
_TORCH_NAMES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}

# Roles of a gated MLP's tensors, in the order the registry's swiglu() templates list them.
ROLES = ("gate", "up", "down")


@dataclass(frozen=True)
class UpcycleOptions:
    """What the user asked for (validated against the model by :func:`build_plan`).

    Attributes:
        num_experts: E, copies of the dense FFN per MoE layer.
        top_k: K, copies each token is routed to.
        granularity: G, fine-grained experts per copy (each of width D/G).
        shared_experts: N, copies of the dense FFN in the always-on shared expert.
        moe_layers: ``all``, ``every:N`` (layers N-1, 2N-1, ...) or a list such as ``0,2,4-7``.
        arch: the target family (registry name or model_type); ``None`` for the source's default.
        router_init: ``random`` (small Gaussian, rows repeated per shard), ``zeros`` or ``kmeans``.
        router_std: standard deviation of the random router; ``None`` uses the config's
            ``initializer_range`` (0.02 without one).
        noise: relative std of Gaussian noise added to each routed expert copy (breaks exactness).
        reinit_ratio: Drop-Upcycling: fraction of each copy's intermediate neurons re-initialised.
        seed: seed of every random choice.
        dtype: ``auto`` (keep the source dtypes), ``float32``, ``bfloat16`` or ``float16``.
        max_shard_size: bound on tensor bytes per output shard (parsed by the caller:
            :func:`moetool.io.sizes.parse_size`).
    """

    num_experts: int
    top_k: int
    granularity: int = 1
    shared_experts: int = 0
    moe_layers: str = "all"
    arch: str | None = None
    router_init: str = "random"
    router_std: float | None = None
    noise: float = 0.0
    reinit_ratio: float = 0.0
    seed: int = 0
    dtype: str = "auto"
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE

    @property
    def breaks_symmetry(self) -> bool:
        """Whether the experts differ from each other (and the model from the dense one)."""
        return self.noise > 0 or self.reinit_ratio > 0


@dataclass(frozen=True)
class Recipe:
    """How one output tensor is made from the source.

    Attributes:
        kind: ``copy`` (unchanged but for the dtype), ``router``, ``expert``, ``shared``,
            ``shared_gate`` or ``dense`` (a dense MLP tensor of a layer that stays dense).
        source: the source tensor it is made from (the dense MLP tensor for experts), if any.
        layer: the decoder layer, -1 for global tensors.
        role: 0 gate, 1 up, 2 down (MLP tensors).
        copy: which copy of the dense FFN (routed experts).
        shard: which of the G fine-grained pieces of that copy.
    """

    kind: str
    source: str | None = None
    layer: int = -1
    role: int = 0
    copy: int = 0
    shard: int = 0


@dataclass(frozen=True)
class UpcyclePlan:
    """Everything the conversion will do, fixed before it starts.

    Attributes:
        source_name / source_revision: the dense checkpoint.
        source_family / target_family: registry entries.
        options: the validated options.
        num_layers / hidden_size / dense_width: from the dense config.
        expert_width: D / G.
        num_experts / top_k: what the config holds (E*G, K*G).
        shared_width: N * D, or ``None`` when the target has no shared experts.
        moe_layers: layers whose MLP becomes MoE.
        moe_layers_spec: the ``--moe-layers`` text.
        routed_down_scale: factor on every routed expert's down projection (G, halved when a shared
            expert takes half of the output, divided by a routed scaling factor).
        shared_down_scale: factor on the shared expert's down projection.
        router_std: standard deviation of the random router.
        config: the target config.json.
        entries / recipes: the output tensors in write order, and how each is made.
        shards: output files with their exact sizes.
        source_dtype: the dense config's dtype name.
        source_params / total_params / active_params: parameter counts (dense; MoE total and per token).
        warnings: things the user should know (extra tensors copied, ...).
    """

    source_name: str
    source_revision: str | None
    source_family: FamilySpec
    target_family: FamilySpec
    options: UpcycleOptions
    num_layers: int
    hidden_size: int
    dense_width: int
    expert_width: int
    num_experts: int
    top_k: int
    shared_width: int | None
    moe_layers: tuple[int, ...]
    moe_layers_spec: str
    routed_down_scale: float
    shared_down_scale: float
    router_std: float
    config: dict[str, Any]
    entries: tuple[PlannedEntry, ...]
    recipes: tuple[Recipe, ...]
    shards: tuple[ShardLayout, ...]
    source_dtype: str
    source_params: int
    total_params: int
    active_params: int
    warnings: tuple[str, ...] = field(default_factory=tuple)

    @property
    def predicted_bytes(self) -> int:
        """Exact size of the weight files (safetensors headers included)."""
        return sum(s.file_bytes for s in self.shards)

    @property
    def tensor_bytes(self) -> int:
        """Bytes of tensor data (the index's ``metadata.total_size``)."""
        return sum(e.nbytes for e in self.entries)

    @property
    def exact(self) -> bool:
        """Whether the output reproduces the dense model (no noise, no re-initialised neurons)."""
        return not self.options.breaks_symmetry

    @property
    def out_dtype(self) -> str:
        """The dtype name written in config.json."""
        return self.config.get("dtype", self.source_dtype)

    def groups(self) -> Iterator[tuple[int, list[tuple[PlannedEntry, Recipe]]]]:
        """Consecutive runs of output tensors of one layer (-1: global tensors), in write order."""
        run: list[tuple[PlannedEntry, Recipe]] = []
        for entry, recipe in zip(self.entries, self.recipes, strict=True):
            if run and run[-1][1].layer != recipe.layer:
                yield run[-1][1].layer, run
                run = []
            run.append((entry, recipe))
        if run:
            yield run[-1][1].layer, run

    def symmetry_breaking(self) -> dict[str, Any]:
        """What makes experts differ, for the report and the model card."""
        opts = self.options
        return {
            "router_init": opts.router_init,
            "router_std": self.router_std if opts.router_init == "random" else None,
            "noise": opts.noise,
            "reinit_ratio": opts.reinit_ratio,
            "seed": opts.seed,
            "experts_identical": not opts.breaks_symmetry,
        }

    def describe(self) -> dict[str, Any]:
        """The plan as a JSON-able document (``--dry-run``, ``--json``, the model card)."""
        opts = self.options
        return {
            "source": self.source_name,
            "source_revision": self.source_revision,
            "source_family": self.source_family.name,
            "target_family": self.target_family.name,
            "model_type": self.config["model_type"],
            "architecture": self.config["architectures"][0],
            "copies": opts.num_experts,
            "copies_per_token": opts.top_k,
            "granularity": opts.granularity,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "expert_width": self.expert_width,
            "dense_width": self.dense_width,
            "shared_experts": opts.shared_experts,
            "shared_width": self.shared_width,
            "moe_layers": list(self.moe_layers),
            "moe_layers_spec": self.moe_layers_spec,
            "num_layers": self.num_layers,
            "routed_down_scale": self.routed_down_scale,
            "shared_down_scale": self.shared_down_scale,
            "dtype": self.out_dtype,
            "source_params": self.source_params,
            "total_params": self.total_params,
            "active_params": self.active_params,
            "num_tensors": len(self.entries),
            "tensor_bytes": self.tensor_bytes,
            "predicted_bytes": self.predicted_bytes,
            "files": [{"name": s.filename, "bytes": s.file_bytes, "tensors": len(s.entries)} for s in self.shards],
            "max_shard_size": opts.max_shard_size,
            "exact": self.exact,
            "symmetry_breaking": self.symmetry_breaking(),
            "options": {k: v for k, v in asdict(opts).items()},
            "warnings": list(self.warnings),
        }


# ----------------------------------------------------------------------------- option parsing


_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def parse_moe_layers(text: str, num_layers: int) -> tuple[list[int], int]:
    """Parse ``--moe-layers`` into (dense layers, sparse step), the form Qwen configs write.

    ``all``: every layer. ``every:N``: layers N-1, 2N-1, ... (every N-th, like ``decoder_sparse_step``).
    A list: layer indices and inclusive ranges, comma-separated (``0,2,4-7``).

    Returns:
        ``(dense_layers, step)``: with ``every:N`` the step is N and no layer is listed; otherwise the
        step is 1 and the layers that stay dense are listed.

    Raises:
        UsageError: unparseable text, a layer out of range, or no MoE layer at all.
    """
    spec = text.strip().lower()
    hint = "use all, every:N (every N-th layer) or a list such as 0,2,4-7"
    if spec == "all":
        return [], 1
    if spec.startswith("every:"):
        try:
            step = int(spec.split(":", 1)[1])
        except ValueError:
            raise UsageError(f"invalid --moe-layers {text!r}", hint=hint) from None
        if step < 1 or step > num_layers:
            raise UsageError(f"--moe-layers every:{step} is out of range for a {num_layers}-layer model", hint=hint)
        return [], step
    layers: set[int] = set()
    for part in spec.split(","):
        match = _RANGE.match(part.strip())
        if not match:
            raise UsageError(f"invalid --moe-layers {text!r}", hint=hint)
        start = int(match.group(1))
        end = int(match.group(2)) if match.group(2) is not None else start
        if end < start or end >= num_layers:
            raise UsageError(
                f"--moe-layers {part.strip()} is out of range: the model has layers 0-{num_layers - 1}", hint=hint
            )
        layers.update(range(start, end + 1))
    return sorted(set(range(num_layers)) - layers), 1


def moe_layer_set(dense_layers: list[int], step: int, num_layers: int) -> tuple[int, ...]:
    """The MoE layers implied by (dense layers, step), the Qwen rule."""
    return tuple(ly for ly in range(num_layers) if ly not in dense_layers and (ly + 1) % step == 0)


def _find_target(name: str) -> FamilySpec:
    """A family by registry name or by model_type (``qwen2_moe`` is both; ``llama4_text`` only the latter)."""
    try:
        target = get_family(name)
    except UnsupportedArchitectureError:
        target = family_for_config({"model_type": name})
    require_capability(target, "upcycle")
    return target


def _check_numbers(options: UpcycleOptions, dense_width: int) -> None:
    e, k, g, n = options.num_experts, options.top_k, options.granularity, options.shared_experts
    if e < 2:
        raise UsageError(f"--num-experts must be at least 2, not {e}", hint="an MoE layer needs experts to choose from")
    if not 1 <= k <= e:
        raise UsageError(f"--top-k must be between 1 and --num-experts ({e}), not {k}", code="BAD_TOP_K")
    if g < 1:
        raise UsageError(f"--granularity must be at least 1, not {g}", code="BAD_GRANULARITY")
    if dense_width % g:
        divisors = [d for d in range(2, min(dense_width, 64) + 1) if dense_width % d == 0][:8]
        raise UsageError(
            f"--granularity {g} does not divide the intermediate size {dense_width}",
            hint=f"choose a divisor of {dense_width}" + (f", e.g. {', '.join(map(str, divisors))}" if divisors else ""),
            code="BAD_GRANULARITY",
        )
    if n < 0:
        raise UsageError(f"--shared-experts must not be negative, not {n}")
    if not math.isfinite(options.noise) or options.noise < 0:
        raise UsageError(f"--noise must be a non-negative number, not {options.noise}")
    if not 0 <= options.reinit_ratio < 1:
        raise UsageError(f"--reinit-ratio must be in [0, 1), not {options.reinit_ratio}")
    if options.router_init not in ROUTER_INITS:
        raise UsageError(f"unknown --router-init {options.router_init!r}", hint=f"use {', '.join(ROUTER_INITS)}")
    if options.router_init == "zeros" and g > 1:
        # All E*G logits tie; torch.topk breaks ties in no documented order, so the K*G chosen shards
        # need not form whole copies and the output would not be exact.
        raise UsageError(
            "--router-init zeros cannot be used with --granularity > 1",
            hint="the shards of a copy must be chosen together; use --router-init random (the default) or kmeans",
        )
    if options.router_std is not None and (not math.isfinite(options.router_std) or options.router_std <= 0):
        raise UsageError(f"the router std must be positive, not {options.router_std}")
    if options.dtype not in DTYPES:
        raise UsageError(f"unknown --dtype {options.dtype!r}", hint=f"use {', '.join(DTYPES)}")
    if isinstance(options.max_shard_size, bool) or not isinstance(options.max_shard_size, int):
        raise UsageError(f"max_shard_size must be a number of bytes, not {options.max_shard_size!r}")
    if options.max_shard_size <= 0:
        raise UsageError(f"max_shard_size must be positive, not {options.max_shard_size}")


def _alternatives(source: FamilySpec, wanted: str) -> str:
    """A hint naming the source's other targets that can do what ``wanted`` needs."""

    def able(spec: FamilySpec) -> bool:
        return bool(spec.shared_experts) if wanted == "shared" else spec.schedule == "qwen"

    others = [name for name in source.upcycle_targets if able(get_family(name))]
    if others:
        return f"use --arch {others[0]}"
    what = "shared experts" if wanted == "shared" else "dense layers between MoE layers"
    return f"no MoE family moetool writes from a {source.name} model has {what}; drop the option"


def _source_dtype(checkpoint: Checkpoint) -> str:
    config = checkpoint.config
    for key in ("dtype", "torch_dtype"):
        value = config.get(key)
        if isinstance(value, str) and value in _DTYPE_NAMES:
            return value
    by_dtype = checkpoint.dtype_bytes()
    floats = {d: b for d, b in by_dtype.items() if d in FLOAT_DTYPES}
    if floats:
        return _TORCH_NAMES[max(floats, key=lambda d: floats[d])]
    return "float32"


# ----------------------------------------------------------------------------- the plan


def build_plan(checkpoint: Checkpoint, options: UpcycleOptions) -> UpcyclePlan:
    """Check the source and the options, and plan every output tensor.

    Args:
        checkpoint: the dense checkpoint (headers read; no tensor data is touched).
        options: what to build.

    Returns:
        The frozen plan.

    Raises:
        UnsupportedArchitectureError: ``ALREADY_MOE``, ``QUANTIZED_INPUT``, or a family upcycle does not
            handle (``UNSUPPORTED_ARCH``).
        UsageError: bad numbers (``BAD_TOP_K``, ``BAD_GRANULARITY``, ...), an ``--arch`` that cannot
            hold the model (``ARCH_INCOMPATIBLE``), an option the target cannot represent
            (``SHARED_UNSUPPORTED``, ``INTERLEAVE_UNSUPPORTED``).
        CheckpointError: tensors missing (``TENSOR_MISSING``) or mis-shaped (``SHAPE_MISMATCH``).
    """
    config = checkpoint.config
    source = _check_source(checkpoint)
    target = _writable_target(source, options.arch)
    dims = resolve_dims(source, config)
    num_layers, hidden = dims.num_layers, dims.values["H"]
    dense_width = _dense_width(checkpoint, dims)
    _check_numbers(options, dense_width)
    e, k, g, n = options.num_experts, options.top_k, options.granularity, options.shared_experts
    _check_shared(source, target, n)
    dense_layers, step, moe_layers = _moe_layers(source, target, options, num_layers)
    _check_mlp(source, target, dims)
    shared_templates, gate_template = _shared_templates(target)
    routed_down_scale, shared_down_scale = _down_scales(g, n, gate_template)
    shared_width = (n * dense_width) if target.shared_experts else None
    out_dtype = options.dtype if options.dtype != "auto" else _source_dtype(checkpoint)
    tconfig = target_config(
        source=source,
        source_dims=dims,
        source_config=config,
        target=target,
        num_experts=e * g,
        top_k=k * g,
        expert_width=dense_width // g,
        shared_width=shared_width,
        dense_layers=dense_layers,
        sparse_step=step,
        dtype=out_dtype,
    )
    tdims = _read_back(target, tconfig, moe_layers)
    _check_source_tensors(checkpoint, source, dims)
    entries, recipes = _plan_tensors(
        checkpoint, source, dims, target, tdims, options, shared_templates, gate_template, out_dtype
    )
    warnings = _copy_unknown_tensors(checkpoint, source, dims, options, entries, recipes)

    from moetool.count.params import count_from_config

    report = count_from_config(tconfig)
    source_report = count_from_config(config)
    shards = plan_shards(entries, options.max_shard_size)
    return UpcyclePlan(
        source_name=checkpoint.name,
        source_revision=checkpoint.revision,
        source_family=source,
        target_family=target,
        options=options,
        num_layers=num_layers,
        hidden_size=hidden,
        dense_width=dense_width,
        expert_width=dense_width // g,
        num_experts=e * g,
        top_k=k * g,
        shared_width=shared_width,
        moe_layers=moe_layers,
        moe_layers_spec=options.moe_layers,
        routed_down_scale=routed_down_scale,
        shared_down_scale=shared_down_scale,
        router_std=_router_std(options, config),
        config=tconfig,
        entries=tuple(entries),
        recipes=tuple(recipes),
        shards=tuple(shards),
        source_dtype=_source_dtype(checkpoint),
        source_params=source_report.total_params,
        total_params=report.total_params,
        active_params=report.active_params,
        warnings=tuple(warnings),
    )


def _check_source(checkpoint: Checkpoint) -> FamilySpec:
    """The source's family, refusing a quantized model, an MoE, or a family upcycle has no target for."""
    config = checkpoint.config
    if config.get("quantization_config"):
        method = (
            config["quantization_config"].get("quant_method", "?")
            if isinstance(config["quantization_config"], dict)
            else "?"
        )
        raise UnsupportedArchitectureError(
            f"{checkpoint.name} is quantized ({method}); upcycle needs full-precision weights",
            hint="upcycle the unquantized model, then quantize the result",
            code="QUANTIZED_INPUT",
        )
    source = family_for_config(config)
    if source.is_moe:
        raise UnsupportedArchitectureError(
            f"{checkpoint.name} is already a Mixture-of-Experts model ({source.name})",
            hint="upcycle takes a dense model; use moetool merge to change the experts of an MoE model",
            code="ALREADY_MOE",
        )
    if not source.upcycle_targets:
        raise UnsupportedArchitectureError(
            f"moetool cannot upcycle {source.name} models",
            hint=f"upcycle supports {', '.join(upcyclable_families())}",
        )
    return source


def _writable_target(source: FamilySpec, arch: str | None) -> FamilySpec:
    """The target family (``--arch`` or the source's counterpart), if moetool can write it."""
    target = _choose_target(source, arch)
    if target.expert_layout is not ExpertLayout.PER_EXPERT or target.routing.rule is not Routing.SOFTMAX_TOPK:
        raise UnsupportedArchitectureError(f"moetool cannot write {target.name} models yet")
    return target


def _dense_width(checkpoint: Checkpoint, dims: Dims) -> int:
    """The source's FFN width (``D``), refusing a config without one."""
    dense_width = dims.values.get("D")
    if not isinstance(dense_width, int) or dense_width <= 0:
        raise CheckpointError(f"{checkpoint.name} has no intermediate size in config.json", code="CONFIG_INVALID")
    return dense_width


def _check_shared(source: FamilySpec, target: FamilySpec, n: int) -> None:
    """Refuse ``--shared-experts`` for a target family without shared experts."""
    if n and not target.shared_experts:
        raise UsageError(
            f"{target.name} has no shared experts, so --shared-experts {n} cannot be written",
            hint=_alternatives(source, "shared"),
            code="SHARED_UNSUPPORTED",
        )


def _moe_layers(
    source: FamilySpec, target: FamilySpec, options: UpcycleOptions, num_layers: int
) -> tuple[list[int], int, tuple[int, ...]]:
    """``--moe-layers`` as ``(dense layers, sparse step, MoE layers)``, if the target can write it."""
    dense_layers, step = parse_moe_layers(options.moe_layers, num_layers)
    if (dense_layers or step != 1) and target.schedule != "qwen":
        raise UsageError(
            f"{target.name} makes every layer MoE (transformers has no per-layer dense option for it), "
            f"so --moe-layers {options.moe_layers} cannot be written",
            hint=_alternatives(source, "interleave"),
            code="INTERLEAVE_UNSUPPORTED",
        )
    moe_layers = moe_layer_set(dense_layers, step, num_layers)
    if not moe_layers:
        raise UsageError(f"--moe-layers {options.moe_layers} leaves no MoE layer", code="NO_MOE_LAYERS")
    return dense_layers, step, moe_layers


def _check_mlp(source: FamilySpec, target: FamilySpec, dims: Dims) -> None:
    """The dense MLP must be exactly gate/up/down: experts have no biases in any family we write."""
    layer_values = dims.for_layer(0)
    mlp_templates = [t for t in source.dense_mlp if template_applies(t, layer_values)]
    if len(mlp_templates) != 3:
        extra = [t.name for t in mlp_templates[3:]]
        raise UsageError(
            f"cannot upcycle this {source.name} model into {target.name}: its MLP has biases "
            f"({', '.join(extra)}) and {target.name} experts have none",
            hint="upcycle a model without MLP biases (mlp_bias: false)",
            code="ARCH_INCOMPATIBLE",
        )


def _down_scales(g: int, n: int, gate_template: T | None) -> tuple[float, float]:
    """The scales of the routed and the shared experts' down projections that keep the output exact.

    The routed copies carry half of the output when a shared expert carries the other half (behind a
    sigmoid gate with zero weight, sigmoid(0) = 1/2: its down projection is then 1/N * 1/2 / 1/2). Each
    copy's G shards together carry 1/G of its weight: scale by G.
    """
    shared_fraction = 0.5 if n else 0.0
    gate_value = 0.5 if gate_template is not None else 1.0
    shared_down_scale = shared_fraction / (gate_value * n) if n else 1.0
    routed_down_scale = g * (1.0 - shared_fraction)  # routed_scaling_factor is written as 1.0
    return routed_down_scale, shared_down_scale


def _read_back(target: FamilySpec, tconfig: dict[str, Any], moe_layers: tuple[int, ...]) -> Dims:
    """The target config's dims; the registry must read back the MoE layers we wrote."""
    tdims = resolve_dims(target, tconfig)
    if tuple(sorted(tdims.moe_layers)) != moe_layers:
        raise MoetoolError(
            f"internal error: the {target.name} config gives MoE layers {sorted(tdims.moe_layers)}, "
            f"expected {list(moe_layers)}",
            code="INTERNAL",
        )
    return tdims


def _copy_unknown_tensors(
    checkpoint: Checkpoint,
    source: FamilySpec,
    dims: Dims,
    options: UpcycleOptions,
    entries: list[PlannedEntry],
    recipes: list[Recipe],
) -> list[str]:
    """Plan a copy of each tensor the source layout does not know (unless it collides); returns the warnings."""
    warnings: list[str] = []
    known = set(t.name for t in planned_tensors(source, dims))
    extras = [name for name in checkpoint.tensors if name not in known]
    if extras:
        taken = {en.name for en in entries}
        clash = [name for name in extras if name in taken]
        if clash:
            raise CheckpointError(
                f"{checkpoint.name} stores {clash[0]!r}, which is not a {source.name} tensor and collides with "
                f"an output tensor",
                code="UNEXPECTED_TENSOR",
            )
        for name in extras:
            info = checkpoint.tensors[name]
            entries.append(PlannedEntry(name, _entry_dtype(info.dtype, options.dtype), info.shape))
            recipes.append(Recipe("copy", name, -2))
        shown = ", ".join(extras[:3]) + (f" and {len(extras) - 3} more" if len(extras) > 3 else "")
        warnings.append(
            f"{len(extras)} tensor(s) the {source.name} layout does not know were copied unchanged: {shown}"
        )
    return warnings


def _router_std(options: UpcycleOptions, config: dict[str, Any]) -> float:
    """The router's init std: ``options.router_std``, else the config's ``initializer_range``, else 0.02."""
    if options.router_std is not None:
        return options.router_std
    init = config.get("initializer_range")
    return float(init) if isinstance(init, (int, float)) and not isinstance(init, bool) and init > 0 else 0.02


def _choose_target(source: FamilySpec, arch: str | None) -> FamilySpec:
    if arch is None:
        return get_family(source.upcycle_targets[0])
    try:
        target = _find_target(arch)
    except UnsupportedArchitectureError:
        raise UsageError(
            f"unknown --arch {arch!r}",
            hint=f"--arch accepts {', '.join(source.upcycle_targets)} for a {source.name} model",
            code="ARCH_INCOMPATIBLE",
        ) from None
    if target.name not in source.upcycle_targets:
        why = "is not a Mixture-of-Experts family" if not target.is_moe else "is not a target moetool writes from it"
        attention = _attention_difference(source, target)
        if target.is_moe and attention:
            why = f"has a different attention layout ({attention})"
        raise UsageError(
            f"cannot upcycle a {source.name} model into {target.name}: {target.name} {why}",
            hint=f"--arch accepts {', '.join(source.upcycle_targets)} for a {source.name} model",
            code="ARCH_INCOMPATIBLE",
        )
    return target


def _attention_difference(source: FamilySpec, target: FamilySpec) -> str:
    """The first attention tensor one family has and the other lacks (by template name), or ''."""
    names_s = {t.name for t in source.attention}
    names_t = {t.name for t in target.attention}
    if names_t - names_s:
        return f"{sorted(names_t - names_s)[0]} has no counterpart in {source.name}"
    if names_s - names_t:
        return f"{sorted(names_s - names_t)[0]} has no counterpart in {target.name}"
    return ""


def _shared_templates(target: FamilySpec) -> tuple[tuple[T, ...], T | None]:
    """The target's shared-expert MLP templates (gate, up, down) and its sigmoid gate template."""
    gate = next((t for t in target.shared_experts if t.name == target.shared_expert_gate), None)
    mlp = tuple(t for t in target.shared_experts if t is not gate)
    return mlp, gate


def _check_source_tensors(checkpoint: Checkpoint, source: FamilySpec, dims: Dims) -> None:
    missing: list[str] = []
    for planned in planned_tensors(source, dims):
        info = checkpoint.tensors.get(planned.name)
        if info is None:
            missing.append(planned.name)
        elif info.shape != planned.shape:
            raise ShapeMismatchError(
                f"{planned.name} in {checkpoint.name} has shape {list(info.shape)}; config.json implies "
                f"{list(planned.shape)}",
                hint="the checkpoint and its config.json disagree; re-create or re-download it",
            )
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise CheckpointError(
            f"{checkpoint.name} lacks {len(missing)} tensor(s) its config.json implies: {shown}",
            hint="the checkpoint is incomplete; re-download it",
            code="TENSOR_MISSING",
        )


def _entry_dtype(source_dtype: str, requested: str) -> str:
    if requested == "auto" or source_dtype not in FLOAT_DTYPES:
        return source_dtype
    return _DTYPE_NAMES[requested]


def _shape(template: T, values: dict[str, Any]) -> tuple[int, ...]:
    return tuple(eval_dim(term, values) for term in template.shape)


def _plan_tensors(
    checkpoint: Checkpoint,
    source: FamilySpec,
    dims: Dims,
    target: FamilySpec,
    tdims: Dims,
    options: UpcycleOptions,
    shared_templates: tuple[T, ...],
    gate_template: T | None,
    out_dtype: str,
) -> tuple[list[PlannedEntry], list[Recipe]]:
    """Output entries and recipes in the order :func:`moetool.arch.plan.planned_tensors` lists them."""
    entries: list[PlannedEntry] = []
    recipes: list[Recipe] = []
    g = options.granularity

    def add(name: str, shape: tuple[int, ...], recipe: Recipe, source_dtype: str) -> None:
        entries.append(PlannedEntry(name, _entry_dtype(source_dtype, options.dtype), shape))
        recipes.append(recipe)

    def copy_templates(prefix_s: str, prefix_t: str, templates: tuple[T, ...], values: dict, layer: int) -> None:
        for t in templates:
            if template_applies(t, values):
                src = prefix_s + t.name
                add(prefix_t + t.name, _shape(t, values), Recipe("copy", src, layer), checkpoint.tensors[src].dtype)

    copy_templates("", "", target.globals_.get("embedding", ()), tdims.values, -1)
    for layer in range(tdims.num_layers):
        values = tdims.for_layer(layer)
        src_values = dims.for_layer(layer)
        prefix_s = source.layer_prefix.format(L=layer)
        prefix_t = target.layer_prefix.format(L=layer)
        copy_templates(prefix_s, prefix_t, target.attention, values, layer)
        copy_templates(prefix_s, prefix_t, target.norms, values, layer)
        dense = [prefix_s + t.name for t in source.dense_mlp if template_applies(t, src_values)][:3]
        mlp_dtype = checkpoint.tensors[dense[0]].dtype
        if not tdims.is_moe_layer(layer):
            for role, t in enumerate(t for t in target.dense_mlp if template_applies(t, values)):
                add(prefix_t + t.name, _shape(t, values), Recipe("dense", dense[role], layer, role), mlp_dtype)
            continue
        router = [t for t in target.router if template_applies(t, values)]
        for t in router:
            add(prefix_t + t.name, _shape(t, values), Recipe("router", dense[0], layer), mlp_dtype)
        routed = [t for t in target.routed_experts if template_applies(t, values)]
        for role, t in enumerate(routed):
            for expert in range(values["E"]):
                recipe = Recipe("expert", dense[role], layer, role, expert // g, expert % g)
                add(prefix_t + t.name.replace("{E}", str(expert)), _shape(t, values), recipe, mlp_dtype)
        for t in target.shared_experts:
            if not template_applies(t, values):
                continue
            if t is gate_template:
                add(prefix_t + t.name, _shape(t, values), Recipe("shared_gate", dense[0], layer), mlp_dtype)
            else:
                role = shared_templates.index(t)
                add(prefix_t + t.name, _shape(t, values), Recipe("shared", dense[role], layer, role), mlp_dtype)
    copy_templates("", "", target.globals_.get("norms", ()), tdims.values, -1)
    copy_templates("", "", target.globals_.get("lm_head", ()), tdims.values, -1)

    expected = [p.name for p in planned_tensors(target, tdims)]
    if [e.name for e in entries] != expected:  # the plan must be exactly what the registry implies
        raise MoetoolError("internal error: the upcycle plan disagrees with the registry", code="INTERNAL")
    return entries, recipes
