"""What ``moetool quantize`` rewrites in a checkpoint, from the family registry.

For every MoE layer: the on-disk names of its routed experts (per expert: gate, up and down tensors
for each expert, as :func:`moetool.arch.families.per_expert` lays them out; fused: one ``[E, 2I, H]``
gate-up and one ``[E, H, I]`` down tensor) and how they map onto transformers' in-memory experts module
(``gate_up_proj [E, 2I, H]``, gate rows first, and ``down_proj [E, H, I]``). Optionally the attention
and shared-expert projections (2-D ``.weight`` templates that are ``nn.Linear`` modules of the same name
in memory). Routed experts that are two-matrix MLPs stored per expert (Switch Transformers' ``wi``/``wo``,
NLLB-MoE's ``fc1``/``fc2``) are ``nn.Linear`` modules in memory too: they are planned as linear maps
(:class:`LinearTensor` of category ``routed_experts``, with their expert and role). Layers are numbered
across an encoder-decoder's stacks (:func:`moetool.arch.experts.layer_prefix`). Everything else (router,
norms, embeddings, lm_head, biases) is copied unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from moetool.arch.dims import Dims, eval_dim, template_applies
from moetool.arch.experts import ExpertRoles, expert_roles, layer_prefix
from moetool.arch.spec import ExpertLayout, ExpertsProtocol, FamilySpec, T
from moetool.errors import CheckpointError, ShapeMismatchError, UnsupportedArchitectureError

#: Categories that can be quantized, in the order they are reported.
QUANTIZABLE = ("routed_experts", "shared_experts", "attention")


@dataclass(frozen=True)
class ExpertTensors:
    """The routed experts of one MoE layer, on disk and in memory.

    Attributes:
        layer: decoder layer index.
        num_experts / intermediate / hidden: E, I and H of this layer.
        gate / up / down: per-expert layout: the tensor name of each expert's projection
            (``[I, H]``, ``[I, H]``, ``[H, I]``).
        gate_up / down_fused: fused layout: the ``[E, 2I, H]`` and ``[E, H, I]`` tensor names.
    """

    layer: int
    num_experts: int
    intermediate: int
    hidden: int
    gate: tuple[str, ...] = ()
    up: tuple[str, ...] = ()
    down: tuple[str, ...] = ()
    gate_up: str | None = None
    down_fused: str | None = None

    @property
    def fused(self) -> bool:
        return self.gate_up is not None

    def names(self) -> list[str]:
        """Every on-disk tensor of these experts."""
        if self.fused:
            return [self.gate_up or "", self.down_fused or ""]
        return [*self.gate, *self.up, *self.down]

    @property
    def params(self) -> int:
        return 3 * self.num_experts * self.intermediate * self.hidden


@dataclass(frozen=True)
class LinearTensor:
    """A 2-D projection quantized as a plain linear map (attention, shared experts, two-matrix experts).

    Attributes:
        layer: decoder layer index.
        category: ``attention``, ``shared_experts`` or ``routed_experts``.
        name: the on-disk tensor name (``model.layers.3.self_attn.q_proj.weight``).
        module: the ``nn.Linear``'s name relative to its decoder layer (``self_attn.q_proj``).
        shape: ``(out, in)``.
        expert: a routed expert's index (``None`` for the other categories).
        role: a routed expert's ``up`` or ``down`` projection.
    """

    layer: int
    category: str
    name: str
    module: str
    shape: tuple[int, int]
    expert: int | None = None
    role: str | None = None


@dataclass
class QuantLayout:
    """Everything one quantize run rewrites.

    Attributes:
        spec / dims: the family and the resolved config.
        categories: what is quantized (``routed_experts`` always).
        experts: per MoE layer, its routed experts.
        linears: per decoder layer, the attention / shared-expert projections to quantize.
    """

    spec: FamilySpec
    dims: Dims
    categories: tuple[str, ...]
    experts: dict[int, ExpertTensors] = field(default_factory=dict)
    linears: dict[int, list[LinearTensor]] = field(default_factory=dict)

    def quantized_names(self) -> set[str]:
        """On-disk names of every tensor replaced by packed codes."""
        names = {n for experts in self.experts.values() for n in experts.names()}
        names |= {lin.name for group in self.linears.values() for lin in group}
        return names

    def routed_names(self) -> list[str]:
        """On-disk names of every routed-expert tensor quantized (fused, per expert, or linear maps)."""
        names = [n for experts in self.experts.values() for n in experts.names()]
        names += [lin.name for group in self.linears.values() for lin in group if lin.category == "routed_experts"]
        return names

    def numel(self) -> dict[str, int]:
        """Logical parameters of every quantized source tensor, from the config's dimensions."""
        out: dict[str, int] = {}
        for info in self.experts.values():
            e, i, h = info.num_experts, info.intermediate, info.hidden
            if info.fused:
                out[info.gate_up or ""] = e * 2 * i * h
                out[info.down_fused or ""] = e * h * i
            else:
                out.update({name: i * h for name in (*info.gate, *info.up, *info.down)})
        for group in self.linears.values():
            out.update({lin.name: lin.shape[0] * lin.shape[1] for lin in group})
        return out

    @property
    def layers(self) -> list[int]:
        """Decoder layers that have something to quantize, ascending."""
        return sorted(set(self.experts) | set(self.linears))


def check_quantizable_family(spec: FamilySpec, dims: Dims, name: str) -> None:
    """Refuse a dense model, or a family whose experts moetool cannot rewrite yet.

    Raises:
        UnsupportedArchitectureError: ``NOT_MOE`` or ``UNSUPPORTED_ARCH``.
    """
    if not spec.is_moe or not dims.moe_layers:
        raise UnsupportedArchitectureError(
            f"{name} is not a Mixture-of-Experts model ({spec.name}: no layer has routed experts)",
            hint="moetool quantize quantizes routed experts; give it an MoE checkpoint",
            code="NOT_MOE",
        )
    # A family derived from transformers records no experts protocol: the in-memory experts module is
    # checked when the model is built (moetool.quantize.loader.experts_module).
    if spec.experts_protocol is not ExpertsProtocol.GATE_UP_DOWN and not spec.derived:
        raise UnsupportedArchitectureError(
            f"moetool quantize does not handle the experts layout of {spec.name} yet",
            hint="supported: families whose transformers experts hold gate_up_proj [E, 2I, H] and down_proj "
            "[E, H, I] (Mixtral, Qwen-MoE, DeepSeek, OLMoE, GraniteMoE, Hunyuan, MiniMax-M2)",
        )


def _expert_roles(spec: FamilySpec) -> tuple[tuple[T, ...], str]:
    """The routed-expert templates in role order (gate, up, down; or fused gate_up, down) and the
    expression of the experts' width: the registry's reading (:func:`moetool.arch.experts.expert_roles`),
    limited to what quantize maps onto transformers' experts module (bias-free, gated, canonical
    orientation)."""
    try:
        roles = expert_roles(spec)
    except UnsupportedArchitectureError:
        roles = None
    if roles is not None and roles.gated and not roles.has_bias and roles.plain:
        order = ("gate_up", "down") if roles.fused else ("gate", "up", "down")
        found = [roles.get(role) for role in order]
        if all(r is not None for r in found):
            return tuple(r.template for r in found if r is not None), roles.width
    raise UnsupportedArchitectureError(
        f"moetool quantize does not know the on-disk expert layout of {spec.name}",
        hint="its routed experts are not gate/up/down projections per expert (or fused gate_up + down)",
    )


def linear_expert_roles(spec: FamilySpec, dims: Dims, layer: int) -> ExpertRoles | None:
    """A layer's routed-expert roles when they are two-matrix MLPs stored per expert in canonical
    orientation (biases allowed: copied unchanged), which quantize rewrites as linear maps; else ``None``."""
    try:
        roles = expert_roles(spec, dims, layer)
    except UnsupportedArchitectureError:
        return None
    if roles.gated or roles.fused or not roles.plain:
        return None
    return roles


def layer_of_path(spec: FamilySpec, dims: Dims, path: str) -> int:
    """The layer index (numbered across an encoder-decoder's stacks) of a decoder-layer module path
    (``decoder.block.2`` -> 2 + the encoder's layer count); -1 when the path is no stack's layer."""
    from moetool.runner.skeleton import layer_index

    if not spec.stacks:
        return layer_index(path)
    for stack, start in zip(spec.stacks, dims.stack_starts, strict=False):
        head, _, local = path.rpartition(".")
        if stack.layers_module and head == stack.layers_module and local.isdigit():
            return start + int(local)
    return -1


def _linear_experts(spec: FamilySpec, dims: Dims, layer: int, roles: ExpertRoles, prefix: str) -> list[LinearTensor]:
    """Each expert's up and down projection of one layer as linear maps, expert by expert (up first)."""
    values = dims.for_layer(layer)
    e, i, h = (eval_dim(s, values) for s in ("E", roles.width, "H"))
    out = []
    for expert in range(e):
        for role in ("up", "down"):
            found = roles.get(role)
            assert found is not None
            module = found.template.name.replace("{E}", str(expert)).removesuffix(".weight")
            shape = (i, h) if role == "up" else (h, i)
            out.append(LinearTensor(layer, "routed_experts", f"{prefix}{module}.weight", module, shape, expert, role))
    return out


def _expand(prefix: str, template: T, values: dict[str, Any], num_experts: int) -> tuple[str, ...]:
    if "{E}" in template.name:
        return tuple(prefix + template.name.replace("{E}", str(e)) for e in range(num_experts))
    return (prefix + template.name,)


def _linear_templates(spec: FamilySpec, category: str) -> tuple[T, ...]:
    templates = spec.attention if category == "attention" else spec.shared_experts
    # Only 2-D weights are linear maps; the shared expert's [1, H] sigmoid gate acts like a router.
    return tuple(
        t
        for t in templates
        if t.name.endswith(".weight")
        and len(t.shape) == 2
        and "{E}" not in t.name
        and t.name != spec.shared_expert_gate
    )


def build_layout(
    spec: FamilySpec,
    dims: Dims,
    checkpoint: Any,
    categories: tuple[str, ...],
    *,
    probe: Callable[[str], str] | None = None,
) -> QuantLayout:
    """The tensors to quantize in ``checkpoint`` (or, with ``probe``, that a quantized one replaced).

    Args:
        spec / dims: the family and resolved config.
        checkpoint: an opened :class:`~moetool.io.checkpoint.Checkpoint` (headers suffice).
        categories: ``routed_experts`` plus optionally ``shared_experts`` and ``attention``.
        probe: for a quantized checkpoint: maps a source tensor's name to the stored tensor that shows
            it was quantized (a storage format's :meth:`~moetool.quantize.formats.base.StorageFormat.probe`);
            shapes are then checked when the stored tensors are decoded.

    Raises:
        UnsupportedArchitectureError: see :func:`check_quantizable_family`.
        CheckpointError: ``EXPERT_MISSING`` when an expert tensor the config implies is not stored.
        ShapeMismatchError: a stored tensor's shape differs from the config's.
    """
    check_quantizable_family(spec, dims, checkpoint.name)
    linear_roles = {layer: linear_expert_roles(spec, dims, layer) for layer in sorted(dims.moe_layers)}
    as_linears = all(roles is not None for roles in linear_roles.values())
    if not as_linears:
        roles, width = _expert_roles(spec)
    layout = QuantLayout(spec=spec, dims=dims, categories=categories)
    stored = checkpoint.tensors
    packed = probe is not None

    def present(name: str) -> bool:
        return (probe(name) if probe is not None else name) in stored

    def check(name: str, shape: tuple[int, ...], layer: int) -> None:
        if not present(name):
            shown = probe(name) if probe is not None else name
            raise CheckpointError(
                f"{checkpoint.name} lacks {shown}, which its config implies (layer {layer})",
                hint="the checkpoint is incomplete or its config.json belongs to another model",
                code="EXPERT_MISSING",
            )
        if packed:
            return
        info = stored[name]
        if tuple(info.shape) != tuple(shape):
            raise ShapeMismatchError(
                f"{name} has shape {list(info.shape)}, the config implies {list(shape)}",
                hint="the checkpoint does not match its config.json",
            )

    for layer in sorted(dims.moe_layers):
        values = dims.for_layer(layer)
        prefix = layer_prefix(spec, dims, layer)
        two_matrix = linear_roles[layer]
        if as_linears and two_matrix is not None:
            for linear in _linear_experts(spec, dims, layer, two_matrix, prefix):
                check(linear.name, linear.shape, layer)
                layout.linears.setdefault(layer, []).append(linear)
            continue
        e, i, h = (eval_dim(s, values) for s in ("E", width, "H"))
        if spec.expert_layout is ExpertLayout.PER_EXPERT:
            gate, up, down = (_expand(prefix, t, values, e) for t in roles)
            experts = ExpertTensors(layer, e, i, h, gate=gate, up=up, down=down)
            for name in gate + up:
                check(name, (i, h), layer)
            for name in down:
                check(name, (h, i), layer)
        else:
            gate_up, down = (_expand(prefix, t, values, e)[0] for t in roles)
            experts = ExpertTensors(layer, e, i, h, gate_up=gate_up, down_fused=down)
            check(gate_up, (e, 2 * i, h), layer)
            check(down, (e, h, i), layer)
        layout.experts[layer] = experts

    for category in ("attention", "shared_experts"):
        if category not in categories:
            continue
        templates = _linear_templates(spec, category)
        for layer in range(dims.num_layers):
            if category == "shared_experts" and not dims.is_moe_layer(layer):
                continue
            values = dims.for_layer(layer)
            prefix = layer_prefix(spec, dims, layer)
            stack = dims.stack_of(layer)[0] if spec.stacks else 0
            for template in templates:
                if not template_applies(template, values) or template.stack != stack:
                    continue
                name = prefix + template.name
                if not present(name):
                    continue  # e.g. a shared expert a layer does not have
                shape = tuple(eval_dim(s, values) for s in template.shape)
                check(name, shape, layer)
                module = template.name[: -len(".weight")]
                layout.linears.setdefault(layer, []).append(LinearTensor(layer, category, name, module, shape))
        if not any(lin.category == category for group in layout.linears.values() for lin in group):
            if packed:
                raise CheckpointError(
                    f"{checkpoint.name} says its {category.replace('_', ' ')} are quantized, but stores none",
                    hint="the checkpoint does not match its quantization_config; re-create it",
                    code="QUANT_SHAPE_MISMATCH",
                )
            raise UnsupportedArchitectureError(
                f"{checkpoint.name} has no {category.replace('_', ' ')} projections to quantize",
                hint=f"drop --quantize-{category.replace('_', '-')}",
                code="NOTHING_TO_QUANTIZE",
            )
    return layout
