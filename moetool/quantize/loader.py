"""Loading quantized checkpoints as transformers models: moetool's own format, and compressed-tensors
layouts transformers cannot map.

The loading is transformers' own ``from_pretrained``, with a small quantizer plugged in through its
public registry (``register_quantization_config`` / ``register_quantizer`` for ``quant_method:
"moetool"``). Before the weights load, the quantizer swaps each MoE layer's experts module (and each
quantized ``nn.Linear``) for an empty :class:`~moetool.quantize.modules.QuantizedExperts` /
:class:`~moetool.quantize.modules.QuantizedLinear`, so transformers loads everything else as usual
(renames, tied weights, dtype, device) and allocates nothing for the experts. After loading, it reads
the stored codes of one layer at a time through the checkpoint's storage format
(:mod:`moetool.quantize.formats`), checks their shapes against the config and installs them. So:

* ``moetool.load_model(path)`` and every moetool command (``eval``, ``profile-routing``) load them
  through :data:`moetool.modeling.LOADERS`;
* in your own code, ``import moetool.quantize`` once and ``AutoModelForCausalLM.from_pretrained(path)``
  works too for moetool's format. Without that import, transformers refuses the folder with an error
  naming ``moetool.load_model`` (the ``transformers_weights`` guard of
  :mod:`~moetool.quantize.formats.moetool_format`), instead of loading random experts.

compressed-tensors checkpoints load through transformers itself (with the compressed-tensors package)
when transformers maps their tensors; moetool's quantizer decodes them itself when it does not (experts
fused on disk, written per expert) or when compressed-tensors is not installed.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moetool.errors import ModelLoadError, UnsupportedArchitectureError
from moetool.quantize.storage import QUANT_METHOD, QuantFormat

if TYPE_CHECKING:
    import torch

    from moetool.io.checkpoint import Checkpoint
    from moetool.quantize.formats.base import StorageFormat
    from moetool.quantize.layout import QuantLayout

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|blocks)\.(\d+)\Z")


def decoder_layers(model: Any) -> dict[int, Any]:
    """Decoder-layer modules of an instantiated model, by index."""
    return {int(m.group(1)): module for name, module in model.named_modules() if (m := _LAYER_RE.search(name))}


def layer_modules(model: Any, layout: QuantLayout) -> dict[int, Any]:
    """Decoder-layer modules of an instantiated model by the layout's layer index (numbered across an
    encoder-decoder's stacks, encoder first)."""
    if not layout.spec.stacks:
        return decoder_layers(model)
    from moetool.quantize.layout import layer_of_path

    found = {}
    for name, module in model.named_modules():
        index = layer_of_path(layout.spec, layout.dims, name)
        if index >= 0:
            found[index] = module
    return found


def experts_module(layer_module: Any, spec: Any, layer: int) -> Any:
    """The routed-experts module of a decoder layer, checked against the gate_up/down protocol.

    Raises:
        UnsupportedArchitectureError: the module is missing or shaped differently.
    """
    try:
        module = layer_module.get_submodule(spec.experts_module)
    except AttributeError:
        raise UnsupportedArchitectureError(
            f"layer {layer} has no experts module '{spec.experts_module}' in the transformers model",
            hint="moetool quantize needs transformers 5 (fused experts modules); upgrade transformers",
        ) from None
    gate_up = getattr(module, "gate_up_proj", None)
    down = getattr(module, "down_proj", None)
    ok = (
        gate_up is not None
        and down is not None
        and gate_up.dim() == 3
        and down.dim() == 3
        and gate_up.shape[0] == down.shape[0]
        and gate_up.shape[1] == 2 * down.shape[2]
        and gate_up.shape[2] == down.shape[1]
        and hasattr(module, "act_fn")
        and not getattr(module, "is_transposed", False)
        and not hasattr(module, "gate_up_proj_bias")
    )
    if not ok:
        raise UnsupportedArchitectureError(
            f"the experts module of layer {layer} ({type(module).__name__}) is not gate_up_proj [E, 2I, H] + "
            "down_proj [E, H, I]",
            hint="this transformers version lays the family out differently; please report it",
        )
    return module


def _set_submodule(root: Any, name: str, module: Any) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


class _Plan:
    """What the quantizer replaced, kept from before to after weight loading."""

    def __init__(self, root: Path, layout: QuantLayout, fmt: QuantFormat, storage: StorageFormat) -> None:
        self.root = root
        self.layout = layout
        self.fmt = fmt
        self.storage = storage


def _plan_for(checkpoint_files: list[str] | None, config: dict[str, Any] | None = None) -> _Plan:
    from moetool.arch.dims import resolve_dims
    from moetool.arch.registry import family_for_config
    from moetool.io.checkpoint import Checkpoint
    from moetool.quantize.layout import build_layout

    if not checkpoint_files:
        raise ModelLoadError(
            "a moetool-quantized model can only be loaded from a checkpoint folder with its safetensors files",
            hint="pass the folder moetool quantize wrote",
        )
    from moetool.quantize.formats import storage_of_config

    root = Path(checkpoint_files[0]).parent
    checkpoint = Checkpoint.open(root)
    config = checkpoint.config
    storage = storage_of_config(config)
    fmt = storage.read_format(config, checkpoint)
    spec = family_for_config(config)
    dims = resolve_dims(spec, config)
    layout = build_layout(spec, dims, checkpoint, fmt.categories, probe=storage.probe(spec))
    return _Plan(root, layout, fmt, storage)


def prepare_model(model: Any, plan: _Plan) -> None:
    """Swap in empty quantized modules (the model is still on the meta device)."""
    from moetool.quantize.modules import QuantizedExperts, QuantizedLinear

    layers = layer_modules(model, plan.layout)
    for layer in plan.layout.experts:
        module = experts_module(layers[layer], plan.layout.spec, layer)
        _set_submodule(layers[layer], plan.layout.spec.experts_module, QuantizedExperts.like(module, plan.fmt))
    for layer, linears in plan.layout.linears.items():
        for linear in linears:
            original = layers[layer].get_submodule(linear.module)
            _set_submodule(layers[layer], linear.module, QuantizedLinear.like(original, plan.fmt))
    ignored = model._keys_to_ignore_on_load_unexpected or set()
    model._keys_to_ignore_on_load_unexpected = {*ignored, plan.storage.packed_keys}


def read_packed_layer(checkpoint: Checkpoint, layout: QuantLayout, fmt: QuantFormat, layer: int) -> dict[str, Any]:
    """Decode one layer's stored codes: ``{"experts": (gate_up, down), "<module>": weight, ...}``.

    Raises:
        CheckpointError: a missing, mis-shaped or corrupt packed tensor.
    """
    from moetool.quantize.formats import format_named

    return format_named(fmt.storage).read_layer(checkpoint, layout, fmt, layer)


def install_weights(model: Any, plan: _Plan) -> None:
    """Read, check and install the packed codes of every quantized module, one layer at a time."""
    from moetool.io.checkpoint import Checkpoint

    checkpoint = Checkpoint.open(plan.root)
    layers = layer_modules(model, plan.layout)
    for layer in plan.layout.layers:
        decoded = plan.storage.read_layer(checkpoint, plan.layout, plan.fmt, layer)
        layer_module = layers[layer]
        device = _device_of(layer_module)
        if "experts" in decoded:
            module = layer_module.get_submodule(plan.layout.spec.experts_module)
            gate_up, down = decoded.pop("experts")
            module.load(gate_up, down)
            module.to(device)
        for name, weight in decoded.items():
            module = layer_module.get_submodule(name)
            module.load(weight)
            module.to(device)


def _device_of(module: Any) -> torch.device:
    import torch

    for tensor in module.parameters():
        if tensor.device.type != "meta":
            return tensor.device
    return torch.device("cpu")


# ----------------------------------------------------------------------------- transformers registration

_REGISTERED = False


def register_with_transformers() -> None:
    """Teach transformers' ``from_pretrained`` the ``moetool`` quant method (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers.quantizers.auto import (
        AUTO_QUANTIZATION_CONFIG_MAPPING,
        AUTO_QUANTIZER_MAPPING,
        register_quantization_config,
        register_quantizer,
    )
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    if QUANT_METHOD in AUTO_QUANTIZER_MAPPING and QUANT_METHOD in AUTO_QUANTIZATION_CONFIG_MAPPING:
        _REGISTERED = True
        return

    class MoetoolQuantConfig(QuantizationConfigMixin):
        """``quantization_config`` of a moetool-quantized checkpoint (see :mod:`moetool.quantize.storage`)."""

        def __init__(self, **kwargs: Any) -> None:
            for key, value in kwargs.items():
                setattr(self, key, value)
            self.quant_method = QUANT_METHOD

        def to_dict(self) -> dict[str, Any]:
            return dict(self.__dict__)

    class MoetoolHfQuantizer(HfQuantizer):
        """Replaces quantized modules before loading and fills them from the checkpoint after."""

        requires_calibration = False

        def __init__(self, quantization_config: Any, **kwargs: Any) -> None:
            super().__init__(quantization_config, **kwargs)
            self._plan: _Plan | None = None

        def _process_model_before_weight_loading(self, model: Any, checkpoint_files: Any = None, **kwargs: Any) -> Any:
            self._plan = _plan_for(list(checkpoint_files or []))
            prepare_model(model, self._plan)
            return model

        def _process_model_after_weight_loading(self, model: Any, **kwargs: Any) -> Any:
            if self._plan is None:  # pragma: no cover - transformers always calls "before" first
                raise ModelLoadError("moetool quantizer: weights loaded before the model was prepared")
            install_weights(model, self._plan)
            return model

        def update_attn_implementation(self, config: Any) -> Any:
            # Runs before transformers resolves the weight files: drop the guard that makes stock
            # transformers refuse a moetool-format folder (see moetool.quantize.formats.moetool_format).
            from moetool.quantize.formats.moetool_format import strip_guard

            return strip_guard(super().update_attn_implementation(config))

        def is_serializable(self) -> bool:
            # Saving would need the packed buffers under their stored names; moetool writes the format.
            return False

        @property
        def is_trainable(self) -> bool:
            return False

    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(MoetoolQuantConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(MoetoolHfQuantizer)
    _REGISTERED = True


def _config_for_moetool_quantizer(checkpoint: Checkpoint) -> Any:
    """The checkpoint's transformers config, set up so that ``from_pretrained`` goes through moetool's
    quantizer (whatever format the folder stores) and without the ``transformers_weights`` guard."""
    from transformers import AutoConfig

    from moetool.modeling import quiet_transformers
    from moetool.quantize.formats.moetool_format import strip_guard

    with quiet_transformers():
        config = AutoConfig.from_pretrained(str(checkpoint.root), local_files_only=True, trust_remote_code=False)
    config.quantization_config = {"quant_method": QUANT_METHOD}
    return strip_guard(config)


def load_quantized(checkpoint: Checkpoint, *, dtype: Any, device: Any, device_map: str | None = None) -> Any:
    """The :data:`moetool.modeling.LOADERS` entry for ``quant_method: "moetool"``.

    Raises:
        ConfigError: an invalid ``quantization_config``.
        CheckpointError: packed tensors missing, mis-shaped or corrupt; other weights not matching.
        ModelLoadError: transformers failing.
    """
    from moetool.modeling import load_weights_transformers

    QuantFormat.from_config(checkpoint.config.get("quantization_config") or {}, where=f"{checkpoint.name}/config.json")
    register_with_transformers()
    config = _config_for_moetool_quantizer(checkpoint)
    return load_weights_transformers(checkpoint, dtype=dtype, device=device, device_map=device_map, config=config)


@contextlib.contextmanager
def quiet_compressed_tensors() -> Iterator[None]:
    """Hide compressed-tensors' own progress bars (plain tqdm on stderr) while transformers loads a
    checkpoint; moetool reports its own progress. ``MOETOOL_DEBUG=1`` shows them."""
    if os.environ.get("MOETOOL_DEBUG", "").strip().lower() not in ("", "0", "false", "no"):
        yield
        return
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def transformers_maps(checkpoint: Checkpoint) -> bool:
    """Whether stock transformers (with compressed-tensors installed) loads this compressed-tensors
    checkpoint right (see :func:`~moetool.quantize.formats.compressed_tensors.transformers_limit`)."""
    from moetool.arch.registry import family_for_config
    from moetool.quantize.formats.compressed_tensors import transformers_limit
    from moetool.quantize.formats.ct_verify import library_version

    if library_version() is None:
        return False
    try:
        spec = family_for_config(checkpoint.config)
    except Exception:  # not a family moetool knows: transformers decides
        return True
    if not spec.is_moe:
        return True
    groups = (checkpoint.config.get("quantization_config") or {}).get("config_groups") or {}
    symmetric = all((g.get("weights") or {}).get("symmetric", True) for g in groups.values() if isinstance(g, dict))
    return transformers_limit(spec, symmetric) is None


def _dequantizing_config(checkpoint: Checkpoint) -> Any:
    """The checkpoint's transformers config with compressed-tensors' ``dequantize`` set: encoder-decoders
    (Switch Transformers) read their linears' ``.weight`` in their weight init, which a linear that stays
    compressed does not have; decompressed at load, they are plain ``nn.Linear`` modules."""
    from transformers import AutoConfig

    from moetool.modeling import quiet_transformers

    with quiet_transformers():
        config = AutoConfig.from_pretrained(str(checkpoint.root), local_files_only=True, trust_remote_code=False)
    config.quantization_config = {**checkpoint.config["quantization_config"], "dequantize": True}
    return config


def load_compressed_tensors(checkpoint: Checkpoint, *, dtype: Any, device: Any, device_map: str | None = None) -> Any:
    """The :data:`moetool.modeling.LOADERS` entry for ``quant_method: "compressed-tensors"``.

    Through transformers (which dequantizes the experts at load time) when it maps the checkpoint;
    otherwise through moetool's quantizer, which keeps the experts packed and decodes them itself.

    Raises:
        ConfigError: settings moetool cannot decode (when transformers cannot load the folder).
        CheckpointError: packed tensors missing or mis-shaped; other weights not matching.
        ModelLoadError: transformers failing.
    """
    from moetool.modeling import load_weights_transformers
    from moetool.quantize.formats import FORMATS

    if transformers_maps(checkpoint):
        config = _dequantizing_config(checkpoint) if checkpoint.config.get("is_encoder_decoder") else None
        with quiet_compressed_tensors():
            return load_weights_transformers(
                checkpoint, dtype=dtype, device=device, device_map=device_map, config=config
            )
    FORMATS["compressed-tensors"].read_format(checkpoint.config, checkpoint)  # refuse early what we cannot decode
    register_with_transformers()
    config = _config_for_moetool_quantizer(checkpoint)
    return load_weights_transformers(checkpoint, dtype=dtype, device=device, device_map=device_map, config=config)
