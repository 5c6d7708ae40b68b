"""Look up the family of a checkpoint from its config.json.

Two sources, one API: the hand-written entries of :mod:`moetool.arch.families` (they carry routing
semantics and conventions transformers does not state, and win where both describe a model type),
and the table generated from the installed transformers (:mod:`moetool.arch.derived`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moetool.arch.derived import derived_families, refused_model_types
from moetool.arch.families import FAMILIES
from moetool.arch.spec import FamilySpec
from moetool.errors import ConfigError, UnsupportedArchitectureError

_HAND_WRITTEN = {mt for spec in FAMILIES for mt in spec.model_types}
ALL_FAMILIES: tuple[FamilySpec, ...] = FAMILIES + tuple(
    spec for spec in derived_families() if not set(spec.model_types) & _HAND_WRITTEN
)

_BY_NAME: dict[str, FamilySpec] = {spec.name: spec for spec in ALL_FAMILIES}
_BY_MODEL_TYPE: dict[str, FamilySpec] = {mt: spec for spec in ALL_FAMILIES for mt in spec.model_types}
_BY_ARCH: dict[str, FamilySpec] = {}
for _spec in ALL_FAMILIES:
    for _arch in _spec.architectures:
        _BY_ARCH.setdefault(_arch, _spec)

#: Commands that check :func:`require_capability` at their start.
COMMANDS = ("inspect", "profile-routing", "merge", "quantize", "upcycle", "distill")


def supported_model_types() -> list[str]:
    """Every ``model_type`` the registry knows, sorted."""
    return sorted(_BY_MODEL_TYPE)


def get_family(name: str) -> FamilySpec:
    """A family by its registry name (``"mixtral"``)."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"unknown model family {name!r}", hint=f"choose one of: {', '.join(sorted(_BY_NAME))}"
        ) from None


def family_for_config(config: Mapping[str, Any]) -> FamilySpec:
    """The family a config.json belongs to, by ``model_type`` first, then ``architectures``.

    Raises:
        ConfigError: ``model_type``/``architectures`` have the wrong type.
        UnsupportedArchitectureError: neither names a known family; the message lists what is supported,
            or says why moetool refuses a model type the installed transformers has.
    """
    model_type = config.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise ConfigError(f"config.json field 'model_type' must be a string, got {model_type!r}")
    if model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list) or not all(isinstance(a, str) for a in architectures):
        raise ConfigError(f"config.json field 'architectures' must be a list of strings, got {architectures!r}")
    for arch in architectures:
        if arch in _BY_ARCH:
            return _BY_ARCH[arch]
    what = f"model_type {model_type!r}" if model_type else "a config.json without model_type"
    if architectures:
        what += f" (architectures {', '.join(architectures)})"
    reason = refused_model_types().get(model_type) if isinstance(model_type, str) else None
    if reason:
        raise UnsupportedArchitectureError(
            f"moetool does not support {what}: {reason}",
            hint="see docs/ARCHITECTURE-families.md for the supported families and the reasons for the others",
        )
    raise UnsupportedArchitectureError(
        f"moetool does not support {what}",
        hint=f"supported model types: {', '.join(supported_model_types())}",
    )


def capability(spec: FamilySpec, command: str) -> str | None:
    """``None`` when ``command`` supports the family, else the reason it does not."""
    if command in spec.capabilities:
        return spec.capabilities[command]
    return None


def require_capability(spec: FamilySpec, command: str) -> None:
    """Refuse, at the start of a command, a family the command does not support.

    Raises:
        UnsupportedArchitectureError: ``FAMILY_UNSUPPORTED`` with the registry's reason.
    """
    reason = capability(spec, command)
    if reason is not None:
        raise UnsupportedArchitectureError(
            f"moetool {command} does not support {spec.name} models: {reason}",
            hint="moetool inspect and profile-routing support it; see docs/ARCHITECTURE-families.md",
            code="FAMILY_UNSUPPORTED",
        )
