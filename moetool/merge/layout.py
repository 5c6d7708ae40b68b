"""Expert and router tensors of one MoE layer, moved between the family's on-disk layout and one canonical form.

The canonical form of a layer's routed experts is stacked float tensors, the way the MLP math reads
them: ``gate`` and ``up`` ``[E, I, H]`` (rows are intermediate neurons) and ``down`` ``[E, H, I]``
(columns are neurons), so a gated expert computes ``down @ (act(gate @ x) * (up @ x))``. Two-matrix
experts (Switch Transformers' ``wi``/``wo``, NLLB-MoE's ``fc1``/``fc2``) have no gate and compute
``down @ act(up @ x)``; a projection's bias, where the family stores one, sits beside it (``up_bias``
``[E, I]``, ``down_bias`` ``[E, H]``).

Which stored tensor plays which role (per expert or fused, transposed, DBRX-flat) is the registry's
reading, :func:`moetool.arch.experts.expert_roles`, shared with quantize; no family name is tested here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from moetool.arch.dims import Dims, eval_dim, template_applies
from moetool.arch.experts import ExpertRole, ExpertRoles, expert_roles, layer_prefix, shape_terms
from moetool.arch.spec import FamilySpec, T
from moetool.errors import CheckpointError, ShapeMismatchError, UnsupportedArchitectureError

# Dtypes merge reads and writes; anything else (FP8, packed integers) needs dequantizing first.
from moetool.io.dtypes import FLOAT_DTYPES
from moetool.merge.ffn import FFN

if TYPE_CHECKING:
    import torch

    from moetool.io.checkpoint import Checkpoint


@dataclass
class Experts:
    """A layer's routed experts in canonical form (see the module docstring).

    Attributes:
        gate: ``[E, I, H]``, or ``None`` for two-matrix experts (``down(act(up x))``).
        up: ``[E, I, H]``.
        down: ``[E, H, I]``.
        gate_bias / up_bias: ``[E, I]`` where the family stores them.
        down_bias: ``[E, H]`` where the family stores it.
    """

    gate: torch.Tensor | None
    up: torch.Tensor
    down: torch.Tensor
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return int(self.up.shape[0])

    @property
    def width(self) -> int:
        """The intermediate size ``I``."""
        return int(self.up.shape[1])

    @property
    def hidden_size(self) -> int:
        """The model width ``H``."""
        return int(self.up.shape[-1])

    def ffn(self, e: int) -> FFN:
        """Expert ``e`` as one FFN (views, not copies)."""
        return FFN(*(None if t is None else t[e] for t in self._parts()))

    def _parts(self) -> tuple[torch.Tensor | None, ...]:
        return (self.gate, self.up, self.down, self.gate_bias, self.up_bias, self.down_bias)

    @classmethod
    def stack(cls, ffns: Sequence[FFN]) -> Experts:
        """Experts made of FFNs of one shape (the same projections and biases present)."""
        import torch

        return cls(*(None if ffns[0][i] is None else torch.stack([f[i] for f in ffns]) for i in range(6)))

    def select(self, index: Iterable[int]) -> Experts:
        """The experts at ``index``, in that order."""
        import torch

        idx = torch.as_tensor(list(index), dtype=torch.long)
        return Experts(*(None if t is None else t[idx] for t in self._parts()))

    def float(self) -> Experts:
        return Experts(*(None if t is None else t.float() for t in self._parts()))


def _merge_roles(spec: FamilySpec, dims: Dims, layer: int) -> ExpertRoles:
    """The registry's reading of a layer's routed experts (:func:`moetool.arch.experts.expert_roles`),
    limited to what merge's canonical form holds: gated or two-matrix projections, with or without a
    bias per projection, except a bias on a fused gate/up pair (its halves' order is not recorded)."""
    roles = expert_roles(spec, dims, layer)
    fused_bias = next((r.bias for r in roles.roles if r.role == "gate_up" and r.bias is not None), None)
    if fused_bias is not None:
        raise UnsupportedArchitectureError(
            f"{spec.name}: its fused gate/up projection has a bias ({fused_bias.name}); merge reads biases "
            "of separate projections only"
        )
    return roles


class LayerTensors:
    """Reads and writes the router and routed experts of a family's MoE layers.

    Layers are numbered as in ``inspect`` (across an encoder-decoder's stacks, encoder first); each
    layer's templates are those of its stack.

    Args:
        spec: the family.
        dims: the source model's resolved dims (for shapes).
        prefix: a wrapper prefix the checkpoint puts before every name (``language_model.``), if any.

    Raises:
        UnsupportedArchitectureError: the experts of an MoE layer are not a gated or two-matrix MLP merge
            can read, or the registry names no router.
    """

    def __init__(self, spec: FamilySpec, dims: Dims, *, prefix: str = "") -> None:
        self.spec = spec
        self.dims = dims
        self.prefix = prefix
        if not spec.router:
            raise UnsupportedArchitectureError(f"{spec.name}: the registry names no router tensor")
        self._roles = {layer: _merge_roles(spec, dims, layer) for layer in sorted(dims.moe_layers)}

    def roles(self, layer: int) -> tuple[ExpertRole, ...]:
        """The routed-expert tensors of a MoE layer, in storage order."""
        return self._roles[layer].roles

    def gated(self, layer: int) -> bool:
        """Whether the layer's experts have a gate projection."""
        return self._roles[layer].gated

    def width(self, layer: int) -> int:
        """The routed-expert width ``I`` of a MoE layer (its stack's: ``d_ff``, ``encoder_ffn_dim``)."""
        return int(eval_dim(self._roles[layer].width, self.dims.for_layer(layer)))

    def _applies(self, templates: Iterable[T], layer: int) -> list[T]:
        values = self.dims.for_layer(layer)
        stack = self.dims.stack_of(layer)[0] if self.spec.stacks else None
        return [t for t in templates if (stack is None or t.stack == stack) and template_applies(t, values)]

    def _router(self, layer: int) -> tuple[T, tuple[T, ...]]:
        """The router weight of a layer, and its other tensors with one entry per expert (DeepSeek's
        correction bias, a router bias)."""
        templates = self._applies(self.spec.router, layer) if self.spec.stacks else list(self.spec.router)
        # The weight is the matrix (derived families list templates by name: a bias may come first).
        weight = next((t for t in templates if shape_terms(t) == ("E", "H")), templates[0])
        vectors = tuple(t for t in templates if t is not weight and shape_terms(t)[:1] == ("E",))
        return weight, vectors

    def _shared(self, layer: int) -> tuple[tuple[T, ...], T | None]:
        """The shared expert's (gate, up, down) templates and its sigmoid gate template, for one layer."""
        shared = self._applies(self.spec.shared_experts, layer)
        gates = [t for t in shared if shape_terms(t) == ("1", "H")]
        mlp = [t for t in shared if t not in gates and not t.name.endswith("bias")]
        return (tuple(mlp) if len(mlp) == 3 else ()), (gates[0] if gates else None)

    # ------------------------------------------------------------------ names

    def layer_prefix(self, layer: int) -> str:
        return self.prefix + layer_prefix(self.spec, self.dims, layer)

    def router_names(self, layer: int) -> list[str]:
        """Router tensors of a layer: the weight first, then per-expert vectors (correction bias)."""
        base = self.layer_prefix(layer)
        weight, vectors = self._router(layer)
        return [base + weight.name] + [base + t.name for t in vectors]

    def _expert_templates(self, layer: int, num_experts: int) -> list[tuple[str, T]]:
        """Every routed-expert tensor of a layer with ``num_experts`` experts (biases after their
        projection), with its template."""
        base = self.layer_prefix(layer)
        out = []
        for role in self.roles(layer):
            for template in (role.template, role.bias):
                if template is None:
                    continue
                if "{E}" in template.name:
                    out += [(base + template.name.replace("{E}", str(e)), template) for e in range(num_experts)]
                else:
                    out.append((base + template.name, template))
        return out

    def expert_names(self, layer: int, num_experts: int) -> list[str]:
        """Every routed-expert tensor name of a layer with ``num_experts`` experts."""
        return [name for name, _ in self._expert_templates(layer, num_experts)]

    def shared_names(self, layer: int) -> list[str]:
        """The shared expert's gate, up and down names (empty when the family or layer has none)."""
        base = self.layer_prefix(layer)
        return [base + t.name for t in self._shared(layer)[0]]

    def shared_gate_name(self, layer: int) -> str | None:
        """The shared expert's sigmoid gate ``[1, H]`` (Qwen2-MoE, Qwen3-Next), if any."""
        gate = self._shared(layer)[1]
        return None if gate is None else self.layer_prefix(layer) + gate.name

    # ------------------------------------------------------------------ reading

    def _read_stacked(self, checkpoint: Checkpoint, layer: int, template: T, num_experts: int) -> torch.Tensor:
        """One template's tensors as a float32 stack ``[E, ...]`` (per-expert tensors are filled in one at
        a time as they are read: the stored copies never pile up)."""
        import torch

        base = self.layer_prefix(layer)
        if "{E}" not in template.name:
            return checkpoint.read_tensor(base + template.name).float()
        per_expert = [base + template.name.replace("{E}", str(e)) for e in range(num_experts)]
        slot = {name: e for e, name in enumerate(per_expert)}
        stacked = None
        for name, tensor in checkpoint.iter_tensors(per_expert):
            if stacked is None:
                stacked = torch.empty((num_experts, *tensor.shape), dtype=torch.float32)
            if tuple(tensor.shape) != tuple(stacked.shape[1:]):
                raise ShapeMismatchError(
                    f"layer {layer}: {name} is {tuple(tensor.shape)}, the other experts' {tuple(stacked.shape[1:])}",
                    hint="the checkpoint and its config.json disagree",
                )
            stacked[slot[name]] = tensor
            del tensor
        assert stacked is not None
        return stacked

    def read_experts(self, checkpoint: Checkpoint, layer: int, num_experts: int, width: int) -> Experts:
        """A layer's routed experts in canonical form, in float32.

        Raises:
            CheckpointError: a tensor is missing (``EXPERT_MISSING``) or not a float dtype.
            ShapeMismatchError: a tensor's shape disagrees with the config.
        """
        hidden = self.dims.values["H"]
        names = self.expert_names(layer, num_experts)
        _check_float(checkpoint, names)
        parts: dict[str, torch.Tensor] = {}
        for role in self.roles(layer):
            stacked = self._read_stacked(checkpoint, layer, role.template, num_experts)
            if role.flat:
                stacked = stacked.reshape(num_experts, width, hidden)
            if role.transposed:
                stacked = stacked.transpose(1, 2)
            parts[role.role] = stacked.contiguous()
            if role.bias is not None:
                parts[role.role + "_bias"] = self._read_stacked(checkpoint, layer, role.bias, num_experts)
        if "gate_up" in parts:
            gate_up = parts.pop("gate_up")
            parts["gate"], parts["up"] = gate_up[:, :width].contiguous(), gate_up[:, width:].contiguous()
        experts = Experts(**{key: parts.get(key) for key in _CANONICAL}, up=parts["up"], down=parts["down"])
        expected = {"gate": (num_experts, width, hidden), "up": (num_experts, width, hidden)}
        expected.update(down=(num_experts, hidden, width), gate_bias=(num_experts, width), up_bias=(num_experts, width))
        expected["down_bias"] = (num_experts, hidden)
        for key, shape in expected.items():
            tensor = getattr(experts, key)
            if tensor is not None and tuple(tensor.shape) != shape:
                raise ShapeMismatchError(
                    f"layer {layer}: routed experts' {key} is {tuple(tensor.shape)} in canonical form, "
                    f"the config implies {shape}",
                    hint="the checkpoint and its config.json disagree",
                )
        return experts

    # ------------------------------------------------------------------ writing

    def expert_shapes(self, layer: int, num_experts: int, width: int) -> list[tuple[str, tuple[int, ...]]]:
        """Names and shapes of the routed-expert tensors written for ``num_experts`` experts of ``width``."""
        values = {**self.dims.for_layer(layer), "E": num_experts, self._roles[layer].width: width}
        out = []
        for name, template in self._expert_templates(layer, num_experts):
            out.append((name, tuple(eval_dim(term, values) for term in template.shape)))
        return out

    def expert_tensors(self, layer: int, experts: Experts, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        """A layer's routed experts in the family's on-disk layout (the inverse of :meth:`read_experts`).

        Yields one tensor at a time, converted as it is asked for, so that the writer holds one and the
        float32 stacks are never copied whole into the output dtype.
        """
        import torch

        base = self.layer_prefix(layer)
        canonical = {"gate": experts.gate, "up": experts.up, "down": experts.down}
        for role in self.roles(layer):
            # The fused gate_up stack is built only for the families that store it.
            if role.role == "gate_up":
                assert experts.gate is not None
                stacked = torch.cat([experts.gate, experts.up], dim=1)
            else:
                stacked = canonical[role.role]
            assert stacked is not None
            if role.transposed:
                stacked = stacked.transpose(1, 2)
            if role.flat:
                stacked = stacked.reshape(-1, stacked.shape[-1])
            yield from _per_template(base, role.template, stacked, experts.num_experts, dtype)
            del stacked
            if role.bias is not None:
                bias = getattr(experts, role.role + "_bias")
                assert bias is not None
                yield from _per_template(base, role.bias, bias, experts.num_experts, dtype)


#: The optional tensors of :class:`Experts`, by keyword.
_CANONICAL = ("gate", "gate_bias", "up_bias", "down_bias")


def _per_template(
    base: str, template: T, stacked: torch.Tensor, num_experts: int, dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """A stack's tensors under a template's names: one per expert (``{E}``) or the stack itself."""
    if "{E}" in template.name:
        for e in range(num_experts):
            yield base + template.name.replace("{E}", str(e)), stacked[e].to(dtype).contiguous()
    else:
        yield base + template.name, stacked.to(dtype).contiguous()


def _check_float(checkpoint: Checkpoint, names: list[str]) -> None:
    missing = [n for n in names if n not in checkpoint.tensors]
    if missing:
        raise CheckpointError(
            f"{len(missing)} routed-expert tensor(s) missing from {checkpoint.name}: {', '.join(missing[:3])}",
            hint="the checkpoint is incomplete or its config.json names more experts than it stores",
            code="EXPERT_MISSING",
        )
    for name in names:
        dtype = checkpoint.tensors[name].dtype
        if dtype not in FLOAT_DTYPES:
            raise CheckpointError(
                f"tensor {name} is stored as {dtype}; merge reads float32, float16 or bfloat16 experts",
                hint="dequantize the checkpoint first (FP8, packed integer and MXFP4 experts are not merged)",
                code="UNSUPPORTED_DTYPE",
            )


def find_prefix(spec: FamilySpec, names: Iterable[str], first_moe_layer: int, dims: Dims | None = None) -> str:
    """The wrapper prefix (``language_model.``) a checkpoint puts before the registry's names, if any.

    ``dims`` is needed for an encoder-decoder (its layers are named per stack)."""
    if dims is not None and spec.stacks:
        stack = dims.stack_of(first_moe_layer)[0]
        router = next(t for t in spec.router if t.stack == stack)
        target = layer_prefix(spec, dims, first_moe_layer) + router.name
    else:
        target = spec.layer_prefix.format(L=first_moe_layer) + spec.router[0].name
    for name in names:
        if name.endswith(target):
            return name[: len(name) - len(target)]
    return ""


def template_shape(template: T, values: Mapping[str, Any]) -> tuple[int, ...]:
    """A template's shape for these dims."""
    return tuple(eval_dim(term, values) for term in template.shape)
