"""Build a model type's config and model skeleton, and list the tensors ``save_pretrained`` would write."""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

#: Auto-class mappings tried in order for "the model class a checkpoint of this type loads as".
_AUTO_MAPPINGS = (
    "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
    "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
    "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
    "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES",
)


@dataclass(frozen=True)
class Saved:
    """One tensor as ``save_pretrained`` writes it."""

    shape: tuple[int, ...]
    dtype: str


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence transformers' logging and Python warnings while probing (thousands of builds)."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            logging.set_verbosity(verbosity)


def config_class(model_type: str) -> Any:
    """The transformers config class of a model type."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    return CONFIG_MAPPING[model_type]


def model_class_name(model_type: str) -> str | None:
    """The class a checkpoint of this model type loads as: causal LM first, then seq2seq, then
    multimodal; a multimodal wrapper (a config with a ``text_config`` and another sub-config) loads as
    its image-text-to-text class, which holds every tensor its checkpoints store."""
    from transformers.models.auto import modeling_auto

    mappings = _AUTO_MAPPINGS
    sub_configs = getattr(config_class(model_type), "sub_configs", None) or {}
    if "text_config" in sub_configs and len(sub_configs) > 1:
        mappings = ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", *_AUTO_MAPPINGS)
    for mapping in mappings:
        names = getattr(modeling_auto, mapping, {})
        name = names.get(model_type)
        if name:
            return name if isinstance(name, str) else name[0]
    return None


def model_class(model_type: str) -> Any:
    import transformers

    name = model_class_name(model_type)
    if name is None:
        raise LookupError(f"transformers has no generative model class for {model_type!r}")
    return getattr(transformers, name)


def make_config(model_type: str, kwargs: Mapping[str, Any]) -> Any:
    """A config of this type from a config.json-like dict (nested dicts for sub-configs such as
    text_config), the way ``from_pretrained`` reads one."""
    return config_class(model_type).from_dict(dict(kwargs))


def build_meta(model_type: str, config: Any) -> Any:
    """The model skeleton on the meta device (no memory; seconds for any size)."""
    import torch

    cls = model_class(model_type)
    with torch.device("meta"):
        return cls._from_config(config)


def saved_tensors(model: Any) -> dict[str, Saved]:
    """What ``save_pretrained`` writes for this model: tied copies dropped, transformers' weight
    conversions reverted (per-expert names where the Hub format has them), in the same order."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = model.state_dict()
    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        state.pop(key, None)
    state = remove_tied_weights_from_state_dict(state, model)
    state = revert_weight_conversion(model, state)
    return {
        name: Saved(tuple(int(d) for d in t.shape), str(t.dtype).removeprefix("torch.")) for name, t in state.items()
    }


def probe(model_type: str, kwargs: Mapping[str, Any]) -> tuple[Any, dict[str, Saved]]:
    """Config and saved tensors for one set of config arguments.

    Raises:
        Exception: whatever transformers raises for an invalid config or a model that cannot be built.
    """
    with quiet():
        config = make_config(model_type, kwargs)
        model = build_meta(model_type, config)
        return config, saved_tensors(model)


_NUMBER = re.compile(r"^\d+$")


def numeric_fields(config_dict: Mapping[str, Any], prefix: str = "") -> dict[str, int | float]:
    """Numeric config values (dotted keys into sub-config dicts), the candidates shapes may depend on.

    A list (or string) of at least two entries also gives a pseudo-field ``len:KEY`` (its length),
    for configs whose layer count is the length of a per-layer list.
    """
    out: dict[str, int | float] = {}
    for key, value in config_dict.items():
        if not isinstance(key, str) or key.startswith("_") or _NUMBER.match(key):
            continue
        if isinstance(value, Mapping):
            if key.endswith("_config") or key in ("ffn_config", "attn_config"):
                out.update(numeric_fields(value, f"{prefix}{key}."))
            continue
        if isinstance(value, (list, str)):
            simple = isinstance(value, str) or all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value)
            per_layer = key.endswith(("layer_types", "block_type", "pattern", "_layers"))
            if simple and per_layer and len(value) >= 2:
                out[f"{prefix}len:{key}"] = len(value)
            if _is_value_list(key, value):
                # Per-layer values (num_attention_heads_per_layer): probed as one field, every layer's
                # value changed alike; the registry reads the list layer by layer.
                out[f"{prefix}each:{key}"] = value[0]
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if key.endswith(("token_id", "token_index", "_id")) or key in _NOT_SHAPES:
            continue
        out[prefix + key] = value
    return out


def _is_value_list(key: str, value: Any) -> bool:
    """A per-layer list of sizes (not of layer indices or types): ``num_attention_heads_per_layer``."""
    return (
        "per_layer" in key
        and isinstance(value, list)
        and len(value) >= 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
        and len(set(value)) == 1
    )


# Numeric config fields that never size a tensor (skipped to save probes).
_NOT_SHAPES = frozenset(
    {
        "initializer_range",
        "rms_norm_eps",
        "layer_norm_eps",
        "layer_norm_epsilon",
        "norm_eps",
        "attention_dropout",
        "hidden_dropout",
        "dropout",
        "activation_dropout",
        "router_aux_loss_coef",
        "router_z_loss_coef",
        "router_jitter_noise",
        "rope_theta",
        "routed_scaling_factor",
        "chunk_size_feed_forward",
        "pretraining_tp",
        "transformers_version",
        "logits_scaling",
        "embedding_multiplier",
        "residual_multiplier",
        "attention_multiplier",
        "max_window_layers",
    }
)


def set_path(kwargs: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """A copy of ``kwargs`` with a dotted key set (creating sub-config dicts)."""
    out = dict(kwargs)
    head, _, rest = dotted.partition(".")
    if not rest:
        out[head] = value
        return out
    inner = out.get(head)
    out[head] = set_path(dict(inner) if isinstance(inner, Mapping) else {}, rest, value)
    return out
