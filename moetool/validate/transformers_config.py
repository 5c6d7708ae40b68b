"""config.json as transformers' own (strict) config class reads it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moetool.validate.findings import HINT_CONFIG, Finding, as_error

# JSON of the configs transformers accepted already (a command checks the same config several times).
_ACCEPTED: set[str] = set()


def transformers_config_findings(config: Mapping[str, Any]) -> list[Finding]:
    """Build the config the way transformers will (``CONFIG_MAPPING[model_type].from_dict``).

    transformers 5 configs are strict dataclasses: a field of another type (``1`` where a float belongs,
    ``"8"`` where a bool belongs) is refused when the model or its tokenizer is loaded. Checking it
    here turns that into a finding naming the field. Imports transformers (and torch with it): for
    commands that load the model anyway, never for ``inspect``.

    Args:
        config: the parsed config.json.

    Returns:
        One finding when transformers refuses the config; none for a model_type it does not know
        (the commands refuse those on their own).
    """
    import json

    try:
        key = json.dumps(config, sort_keys=True, default=str)
    except (TypeError, ValueError):
        key = None
    if key is not None and key in _ACCEPTED:
        return []
    model_type = config.get("model_type")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        return []
    config_class = CONFIG_MAPPING[model_type]
    from moetool.modeling import quiet_transformers

    try:
        with quiet_transformers():
            # As from_pretrained reads it: transformers writes inf/NaN as {"__float__": "Infinity"}
            # (Mamba families' time_step_limit).
            decode = getattr(config_class, "_decode_special_floats", lambda c: c)
            config_class.from_dict(decode(dict(config)))
    except Exception as exc:  # any refusal of hostile input becomes a finding, whatever its class
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = lines[-1] if lines else type(exc).__name__
        return [
            Finding(
                "CONFIG_INVALID",
                f"transformers' {config_class.__name__} refuses config.json: {detail}",
                HINT_CONFIG,
            )
        ]
    if key is not None:
        _ACCEPTED.add(key)
    return []


def check_transformers_config(checkpoint: Any) -> None:
    """Raise :func:`transformers_config_findings` as a ``CONFIG_INVALID`` error (before a model load).

    Raises:
        ConfigError: transformers refuses the checkpoint's config.json.
    """
    error = as_error(transformers_config_findings(checkpoint.config), checkpoint.name)
    if error is not None:
        raise error
