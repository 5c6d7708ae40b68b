"""Which stored tensor of a layer's routed experts plays which role: the one reading of the registry's
expert templates that every weight-rewriting command (merge, quantize, upcycle) shares.

An expert is an MLP ``down(act(gate(x)) * up(x))`` (gated: SwiGLU and its kin) or ``down(act(up(x)))``
(two-matrix: Switch Transformers' ``wi``/``wo``, NLLB-MoE's ``fc1``/``fc2``, ReLU^2 experts). Its
canonical matrices are ``gate``/``up`` ``[W, H]`` (rows are intermediate neurons) and ``down`` ``[H, W]``.
On disk they are stored:

* per expert (``{E}`` in the name, 2-D), found by name (``gate_proj``/``w1``, ``up_proj``/``w3``/``wi``/
  ``fc1``, ``down_proj``/``w2``/``wo``/``fc2``), or for hand-written families in the order
  :func:`moetool.arch.families.swiglu` lists them;
* fused (one tensor per projection, experts stacked first): a gate/up pair on a ``2*W`` axis, gate first,
  or separate tensors, possibly with the two matrix axes swapped (``[E, H, 2*I]``), or flattened as
  ``[E*I, H]`` (DBRX). The symbolic shapes say which axis is which.

Biases (``fc1.bias``, ``gate_up_proj_bias``) are attached to the role whose name they share. No family name
is tested here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from moetool.arch.dims import Dims, template_applies
from moetool.arch.spec import FamilySpec, T
from moetool.errors import UnsupportedArchitectureError

#: Name stems of each per-expert role, in the families transformers ships (the parameter's module name).
ROLE_STEMS = {
    "gate": ("gate_proj", "w1"),
    "up": ("up_proj", "w3", "wi", "fc1", "input_linear"),
    "down": ("down_proj", "w2", "wo", "fc2", "output_linear"),
}
#: Hand-written per-expert families list their templates in this order (see ``swiglu``).
_POSITIONAL = ("gate", "up", "down")


@dataclass(frozen=True)
class ExpertRole:
    """How one stored routed-expert tensor maps to a canonical matrix.

    Attributes:
        template: the registry template.
        role: ``gate``, ``up``, ``down`` or ``gate_up`` (gate rows first, then up).
        transposed: stored with the two matrix axes swapped relative to canonical.
        flat: experts flattened into the first axis (``[E*I, H]``), read as ``[E, I, H]``.
        bias: the template of this projection's bias, if the family stores one.
    """

    template: T
    role: str
    transposed: bool = False
    flat: bool = False
    bias: T | None = None

    @property
    def per_expert(self) -> bool:
        """One tensor per expert (``{E}`` in the name) rather than one stacked tensor."""
        return "{E}" in self.template.name


@dataclass(frozen=True)
class ExpertRoles:
    """A layer's routed-expert tensors by role.

    Attributes:
        roles: in storage order.
        width: the expression of one expert's width (``I``, ``moe_intermediate_size``, ``d_ff``).
    """

    roles: tuple[ExpertRole, ...]
    width: str

    def get(self, role: str) -> ExpertRole | None:
        """The role's tensor, or ``None`` if the layer stores none."""
        return next((r for r in self.roles if r.role == role), None)

    @property
    def gated(self) -> bool:
        """A gate projection beside up (``act(gate x) * up x``); else a two-matrix MLP."""
        return any(r.role in ("gate", "gate_up") for r in self.roles)

    @property
    def fused(self) -> bool:
        """Experts stacked in one tensor per projection."""
        return not any(r.per_expert for r in self.roles)

    @property
    def has_bias(self) -> bool:
        return any(r.bias is not None for r in self.roles)

    @property
    def plain(self) -> bool:
        """Stored exactly in canonical form: no transposed or flattened tensor."""
        return not any(r.transposed or r.flat for r in self.roles)

    @property
    def templates(self) -> tuple[T, ...]:
        """Every template, biases included."""
        return tuple(t for r in self.roles for t in (r.template, r.bias) if t is not None)


def shape_terms(template: T) -> tuple[str, ...]:
    """A template's symbolic shape as strings without spaces (``("E", "2*I", "H")``)."""
    return tuple(str(term).replace(" ", "") for term in template.shape)


def _stem(template: T) -> str:
    """The projection's module name: ``experts.3.gate_proj.weight`` -> ``gate_proj``; a fused parameter
    (``experts.gate_up_proj``, ``experts.gate_up_proj_bias``) -> ``gate_up_proj``."""
    parts = template.name.split(".")
    if parts[-1] in ("weight", "bias") and len(parts) > 1:
        return parts[-2]
    return parts[-1].removesuffix("_bias")


def _is_bias(template: T) -> bool:
    terms = shape_terms(template)
    matrix = terms[1:] if terms[:1] == ("E",) and "{E}" not in template.name else terms
    return template.name.endswith("bias") or len(matrix) < 2


def _by_stem(template: T, stems: dict[str, tuple[str, ...]]) -> str | None:
    stem = _stem(template)
    found = [role for role, names in stems.items() if stem in names]
    return found[0] if len(found) == 1 else None


def _matrix_axes(template: T, per_expert: bool) -> tuple[tuple[str, str], bool]:
    """A tensor's two matrix axes and whether it is DBRX-flat; raises when the shape is not a matrix."""
    terms = shape_terms(template)
    if per_expert and len(terms) == 2:
        return (terms[0], terms[1]), False
    if not per_expert and len(terms) == 3 and terms[0] == "E":
        return (terms[1], terms[2]), False
    if not per_expert and len(terms) == 2 and terms[0].startswith("E*"):
        return (terms[0][2:], terms[1]), True
    raise ValueError(f"{template.name} {terms} is not an expert matrix")


def _width(axis: str, role: str) -> str:
    return axis[2:] if role == "gate_up" and axis.startswith("2*") else axis


def roles_of(templates: Sequence[T], *, by_position: bool = False, family: str = "this family") -> ExpertRoles:
    """Interpret one layer's routed-expert templates.

    Args:
        templates: the templates that apply to the layer (one stack's, where the family has several).
        by_position: three unnamed per-expert or fused matrices are gate, up, down in that order (what the
            hand-written registry promises); derived families are read by name only.
        family: named in errors.

    Raises:
        UnsupportedArchitectureError: ``UNSUPPORTED_ARCH`` when the templates are not a gated or
        two-matrix MLP whose roles can be told apart.
    """

    def refuse(why: str) -> UnsupportedArchitectureError:
        names = ", ".join(t.name for t in templates) or "none"
        return UnsupportedArchitectureError(
            f"{family}: cannot tell its routed experts' projections apart ({why}; templates: {names})",
            hint="moetool rewrites experts that are gated (gate/up/down) or two-matrix (up/down) MLPs",
        )

    matrices = [t for t in templates if not _is_bias(t)]
    biases = [t for t in templates if _is_bias(t)]
    extra = [t.name for t in biases if "bias" not in t.name.rsplit(".", 1)[-1]]
    if extra:
        raise refuse(f"{extra[0]} is neither a projection nor its bias (a norm or scale inside the experts)")
    if not matrices:
        raise refuse("no expert matrices")
    per_expert = all("{E}" in t.name for t in matrices)
    if not per_expert and any("{E}" in t.name for t in matrices):
        raise refuse("per-expert and stacked tensors mixed")
    found: list[tuple[T, str]] = []
    for position, template in enumerate(matrices):
        try:
            axes, _ = _matrix_axes(template, per_expert)
        except ValueError as exc:
            raise refuse(str(exc)) from None
        if not per_expert and any(axis.startswith("2*") for axis in axes):
            role: str | None = "gate_up"
        else:
            role = _by_stem(template, ROLE_STEMS)
            if role is None and by_position and len(matrices) == 3:
                role = _POSITIONAL[position]
        if role is None:
            raise refuse(f"no role for {template.name}")
        found.append((template, role))
    kinds = sorted(role for _, role in found)
    if kinds not in (["down", "gate", "up"], ["down", "gate_up"], ["down", "up"]):
        raise refuse(f"roles {kinds}")
    roles = []
    width: str | None = None
    for template, role in found:
        axes, flat = _matrix_axes(template, per_expert)
        # Canonical: gate / up / gate_up have H last (rows are neurons); down has H first.
        transposed = axes[0] == "H" if role != "down" else axes[0] != "H"
        neuron_axis = axes[1] if transposed != (role == "down") else axes[0]
        if role != "down":
            width = _width(neuron_axis, role)
        stem = _stem(template)
        bias = next((b for b in biases if _stem(b) == stem), None)
        roles.append(ExpertRole(template, role, transposed, flat, bias))
    used = {r.bias for r in roles if r.bias is not None}
    if len(used) != len(biases):
        raise refuse("a bias that belongs to no projection")
    assert width is not None
    for role in roles:
        axes, _ = _matrix_axes(role.template, per_expert)
        neurons = axes[0] if role.transposed == (role.role == "down") else axes[1]
        hidden = axes[1] if neurons == axes[0] else axes[0]
        expected = f"2*{width}" if role.role == "gate_up" else width
        if (neurons, hidden) != (expected, "H"):
            raise refuse(f"{role.template.name} is {shape_terms(role.template)}, not a projection of width {width}")
    return ExpertRoles(tuple(roles), width)


def roles_by_stack(templates: Sequence[T], *, family: str = "this family") -> list[ExpertRoles]:
    """The roles of each layer stack's routed-expert templates (one entry for decoder-only families).

    Raises:
        UnsupportedArchitectureError: see :func:`roles_of`.
    """
    stacks = sorted({t.stack for t in templates}) or [0]
    return [roles_of([t for t in templates if t.stack == stack], family=family) for stack in stacks]


def layer_templates(spec: FamilySpec, dims: Dims | None = None, layer: int | None = None) -> list[T]:
    """The routed-expert templates that apply to one layer (its stack's, its conditions'); all of them
    when no layer is given."""
    templates: Iterable[T] = spec.routed_experts
    if dims is not None and layer is not None:
        values = dims.for_layer(layer)
        stack = dims.stack_of(layer)[0] if spec.stacks else None
        templates = [t for t in templates if (stack is None or t.stack == stack) and template_applies(t, values)]
    return list(templates)


def expert_roles(spec: FamilySpec, dims: Dims | None = None, layer: int | None = None) -> ExpertRoles:
    """The roles of a family's routed-expert tensors (of one layer, for families whose layers differ).

    Raises:
        UnsupportedArchitectureError: see :func:`roles_of`.
    """
    return roles_of(layer_templates(spec, dims, layer), by_position=not spec.derived, family=spec.name)


def layer_prefix(spec: FamilySpec, dims: Dims, layer: int) -> str:
    """The on-disk name prefix of a layer, numbered across an encoder-decoder's stacks as in ``inspect``."""
    if spec.stacks:
        stack, local = dims.stack_of(layer)
        return spec.stacks[stack].prefix.format(L=local)
    return spec.layer_prefix.format(L=layer)
