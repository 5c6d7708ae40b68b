"""Expert and router tensors of one MoE layer, moved between the family's on-disk layout and one canonical form.

The canonical form of a layer's routed experts is three stacked float tensors, the way the SwiGLU math
reads them: ``gate`` and ``up`` ``[E, I, H]`` (rows are intermediate neurons) and ``down`` ``[E, H, I]``
(columns are neurons), so an expert computes ``down @ (act(gate @ x) * (up @ x))``.

Which stored tensor plays which role (per expert or fused, transposed, DBRX-flat) is the registry's
reading, :func:`moetool.arch.experts.expert_roles`, shared with quantize; no family name is tested here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from moetool.arch.dims import Dims, eval_dim, template_applies
from moetool.arch.experts import ExpertRole, expert_roles
from moetool.arch.spec import FamilySpec, T
from moetool.errors import CheckpointError, ShapeMismatchError, UnsupportedArchitectureError

# Dtypes merge reads and writes; anything else (FP8, packed integers) needs dequantizing first.
from moetool.io.dtypes import FLOAT_DTYPES

if TYPE_CHECKING:
    import torch

    from moetool.io.checkpoint import Checkpoint


@dataclass
class Experts:
    """A layer's routed experts in canonical form (see the module docstring).

    Attributes:
        gate: ``[E, I, H]``.
        up: ``[E, I, H]``.
        down: ``[E, H, I]``.
    """

    gate: torch.Tensor
    up: torch.Tensor
    down: torch.Tensor

    @property
    def num_experts(self) -> int:
        return int(self.gate.shape[0])

    @property
    def width(self) -> int:
        """The intermediate size ``I``."""
        return int(self.gate.shape[1])

    def select(self, index: Iterable[int]) -> Experts:
        """The experts at ``index``, in that order."""
        import torch

        idx = torch.as_tensor(list(index), dtype=torch.long)
        return Experts(self.gate[idx], self.up[idx], self.down[idx])

    def float(self) -> Experts:
        return Experts(self.gate.float(), self.up.float(), self.down.float())


def _shape_terms(template: T) -> tuple[str, ...]:
    return tuple(str(term).replace(" ", "") for term in template.shape)


def _expert_roles(spec: FamilySpec) -> tuple[ExpertRole, ...]:
    """The registry's reading of the routed experts (:func:`moetool.arch.experts.expert_roles`), limited
    to what merge's canonical form holds: gated experts without biases."""
    if any(t.name.endswith("bias") for t in spec.routed_experts):
        raise UnsupportedArchitectureError(f"{spec.name} experts have biases; merge handles plain SwiGLU experts only")
    roles = expert_roles(spec)
    if not roles.gated:
        raise UnsupportedArchitectureError(
            f"{spec.name}: its experts are two-matrix MLPs (no gate projection); merge handles gated experts only"
        )
    return roles.roles


class LayerTensors:
    """Reads and writes the router and routed experts of a family's MoE layers.

    Args:
        spec: the family.
        dims: the source model's resolved dims (for shapes).
        prefix: a wrapper prefix the checkpoint puts before every name (``language_model.``), if any.
    """

    def __init__(self, spec: FamilySpec, dims: Dims, *, prefix: str = "") -> None:
        self.spec = spec
        self.dims = dims
        self.prefix = prefix
        self.roles = _expert_roles(spec)
        if not spec.router:
            raise UnsupportedArchitectureError(f"{spec.name}: the registry names no router tensor")
        self.router_weight = spec.router[0]
        # Other router tensors with one entry per expert (DeepSeek's correction bias, a router bias).
        self.router_vectors = tuple(t for t in spec.router[1:] if _shape_terms(t)[:1] == ("E",))

    def _shared(self, layer: int) -> tuple[tuple[T, ...], T | None]:
        """The shared expert's (gate, up, down) templates and its sigmoid gate template, for one layer."""
        values = self.dims.for_layer(layer)
        shared = [t for t in self.spec.shared_experts if template_applies(t, values)]
        gates = [t for t in shared if _shape_terms(t) == ("1", "H")]
        mlp = [t for t in shared if t not in gates and not t.name.endswith("bias")]
        return (tuple(mlp) if len(mlp) == 3 else ()), (gates[0] if gates else None)

    # ------------------------------------------------------------------ names

    def layer_prefix(self, layer: int) -> str:
        return self.prefix + self.spec.layer_prefix.format(L=layer)

    def router_names(self, layer: int) -> list[str]:
        """Router tensors of a layer: the weight first, then per-expert vectors (correction bias)."""
        base = self.layer_prefix(layer)
        return [base + self.router_weight.name] + [base + t.name for t in self.router_vectors]

    def expert_names(self, layer: int, num_experts: int) -> list[str]:
        """Every routed-expert tensor name of a layer with ``num_experts`` experts."""
        base = self.layer_prefix(layer)
        names = []
        for role in self.roles:
            if "{E}" in role.template.name:
                names += [base + role.template.name.replace("{E}", str(e)) for e in range(num_experts)]
            else:
                names.append(base + role.template.name)
        return names

    def shared_names(self, layer: int) -> list[str]:
        """The shared expert's gate, up and down names (empty when the family or layer has none)."""
        base = self.layer_prefix(layer)
        return [base + t.name for t in self._shared(layer)[0]]

    def shared_gate_name(self, layer: int) -> str | None:
        """The shared expert's sigmoid gate ``[1, H]`` (Qwen2-MoE, Qwen3-Next), if any."""
        gate = self._shared(layer)[1]
        return None if gate is None else self.layer_prefix(layer) + gate.name

    # ------------------------------------------------------------------ reading

    def read_experts(self, checkpoint: Checkpoint, layer: int, num_experts: int, width: int) -> Experts:
        """A layer's routed experts in canonical form, in float32.

        Raises:
            CheckpointError: a tensor is missing (``EXPERT_MISSING``) or not a float dtype.
            ShapeMismatchError: a tensor's shape disagrees with the config.
        """
        import torch

        hidden = self.dims.values["H"]
        names = self.expert_names(layer, num_experts)
        _check_float(checkpoint, names)
        parts: dict[str, torch.Tensor] = {}
        base = self.layer_prefix(layer)
        for role in self.roles:
            if "{E}" in role.template.name:
                # Filled expert by expert as the tensors are read: the stored copies never pile up.
                per_expert = [base + role.template.name.replace("{E}", str(e)) for e in range(num_experts)]
                slot = {name: e for e, name in enumerate(per_expert)}
                stacked = None
                for name, tensor in checkpoint.iter_tensors(per_expert):
                    if stacked is None:
                        stacked = torch.empty((num_experts, *tensor.shape), dtype=torch.float32)
                    if tuple(tensor.shape) != tuple(stacked.shape[1:]):
                        raise ShapeMismatchError(
                            f"layer {layer}: {name} is {tuple(tensor.shape)}, the other experts' "
                            f"{tuple(stacked.shape[1:])}",
                            hint="the checkpoint and its config.json disagree",
                        )
                    stacked[slot[name]] = tensor
                    del tensor
                assert stacked is not None
            else:
                stacked = checkpoint.read_tensor(base + role.template.name).float()
                if role.flat:
                    stacked = stacked.reshape(num_experts, width, hidden)
            if role.transposed:
                stacked = stacked.transpose(1, 2)
            parts[role.role] = stacked.contiguous()
        if "gate_up" in parts:
            gate_up = parts.pop("gate_up")
            parts["gate"], parts["up"] = gate_up[:, :width].contiguous(), gate_up[:, width:].contiguous()
        experts = Experts(parts["gate"], parts["up"], parts["down"])
        expected = {"gate": (num_experts, width, hidden), "up": (num_experts, width, hidden)}
        expected["down"] = (num_experts, hidden, width)
        for key, shape in expected.items():
            got = tuple(getattr(experts, key).shape)
            if got != shape:
                raise ShapeMismatchError(
                    f"layer {layer}: routed experts' {key} projection is {got} in canonical form, "
                    f"the config implies {shape}",
                    hint="the checkpoint and its config.json disagree",
                )
        return experts

    # ------------------------------------------------------------------ writing

    def expert_shapes(self, layer: int, num_experts: int, width: int) -> list[tuple[str, tuple[int, ...]]]:
        """Names and shapes of the routed-expert tensors written for ``num_experts`` experts of ``width``."""
        values = {**self.dims.for_layer(layer), "E": num_experts, "I": width}
        out = []
        for name, template in self._expert_templates(layer, num_experts):
            out.append((name, tuple(eval_dim(term, values) for term in template.shape)))
        return out

    def _expert_templates(self, layer: int, num_experts: int) -> list[tuple[str, T]]:
        base = self.layer_prefix(layer)
        out = []
        for role in self.roles:
            if "{E}" in role.template.name:
                out += [(base + role.template.name.replace("{E}", str(e)), role.template) for e in range(num_experts)]
            else:
                out.append((base + role.template.name, role.template))
        return out

    def expert_tensors(self, layer: int, experts: Experts, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
        """A layer's routed experts in the family's on-disk layout (the inverse of :meth:`read_experts`).

        Yields one tensor at a time, converted as it is asked for, so that the writer holds one and the
        float32 stacks are never copied whole into the output dtype.
        """
        import torch

        base = self.layer_prefix(layer)
        canonical = {"gate": experts.gate, "up": experts.up, "down": experts.down}
        for role in self.roles:
            # The fused gate_up stack is built only for the families that store it.
            stacked = torch.cat([experts.gate, experts.up], dim=1) if role.role == "gate_up" else canonical[role.role]
            if role.transposed:
                stacked = stacked.transpose(1, 2)
            if "{E}" in role.template.name:
                for e in range(experts.num_experts):
                    yield base + role.template.name.replace("{E}", str(e)), stacked[e].to(dtype).contiguous()
            else:
                if role.flat:
                    stacked = stacked.reshape(-1, stacked.shape[-1])
                yield base + role.template.name, stacked.to(dtype).contiguous()
            del stacked


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


def find_prefix(spec: FamilySpec, names: Iterable[str], first_moe_layer: int) -> str:
    """The wrapper prefix (``language_model.``) a checkpoint puts before the registry's names, if any."""
    target = spec.layer_prefix.format(L=first_moe_layer) + spec.router[0].name
    for name in names:
        if name.endswith(target):
            return name[: len(name) - len(target)]
    return ""


def template_shape(template: T, values: Mapping[str, Any]) -> tuple[int, ...]:
    """A template's shape for these dims."""
    return tuple(eval_dim(term, values) for term in template.shape)
