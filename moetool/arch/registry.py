"""Look up the family of a checkpoint from its config.json."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moetool.arch.families import FAMILIES
from moetool.arch.spec import FamilySpec
from moetool.errors import ConfigError, UnsupportedArchitectureError

_BY_NAME: dict[str, FamilySpec] = {spec.name: spec for spec in FAMILIES}
_BY_MODEL_TYPE: dict[str, FamilySpec] = {mt: spec for spec in FAMILIES for mt in spec.model_types}
_BY_ARCH: dict[str, FamilySpec] = {arch: spec for spec in FAMILIES for arch in spec.architectures}


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
        UnsupportedArchitectureError: neither names a known family; the message lists what is supported.
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
    raise UnsupportedArchitectureError(
        f"moetool does not support {what}",
        hint=f"supported model types: {', '.join(supported_model_types())}",
    )
