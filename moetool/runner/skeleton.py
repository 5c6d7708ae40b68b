"""The bridge to transformers: a model skeleton without weights, and its weights loaded one piece at a time.

:func:`build_skeleton` instantiates the checkpoint's transformers model on the meta device (parameters
take no memory; buffers such as rotary frequencies stay real, on the CPU, because they are computed,
not loaded). :class:`WeightPlan` sorts the checkpoint's tensors into *pieces*: the input embedding, one
piece per decoder layer, the output head (lm_head) and the small rest (final norm, ...). A piece is
loaded with :meth:`WeightPlan.load` and released with :meth:`WeightPlan.release`.

Why not accelerate's offloading (``cpu_offload``, ``disk_offload``, ``load_checkpoint_in_model``)? Its
hooks run the model batch-major: every forward pass of every batch loads every layer again, so the
weights are read once per batch. The runner runs layer-major (each layer over all batches, then the
next), reading each weight once. accelerate's ``init_empty_weights`` is what builds the skeleton.

Why transformers' loading internals (``get_model_conversion_mapping``,
``convert_and_load_state_dict_in_model``)? transformers 5 stores experts fused in memory
(``experts.gate_up_proj [E, 2I, H]``) and per expert on disk (``experts.0.w1.weight``), and each family
has its own renames and merges. Using transformers' own conversion keeps the loaded layer bit-identical
to ``from_pretrained``'s (a test checks it for every family) instead of re-implementing 60 families'
mappings. Every use of those internals is in this module.

torch and transformers are imported inside the functions.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from moetool.errors import CheckpointError, ModelLoadError, UnsupportedArchitectureError
from moetool.runner.heap import release_heap

if TYPE_CHECKING:
    import torch

    from moetool.io.checkpoint import Checkpoint

#: Piece names besides ``layer:<path>``.
EMBED = "embed"
HEAD = "head"
GLOBALS = "globals"


def _listing(names: Iterable[str], limit: int = 3) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def build_skeleton(checkpoint: Checkpoint, dtype: torch.dtype) -> Any:
    """The checkpoint's transformers model with meta parameters (no weight memory), in eval mode.

    Raises:
        ModelLoadError: transformers cannot build the model from its config.
        UnsupportedArchitectureError / ModelLoadError: see :func:`moetool.modeling.check_transformers_support`.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from moetool.errors import first_line
    from moetool.modeling import auto_model_class, check_transformers_support, quiet_transformers

    check_transformers_support(checkpoint)
    try:
        with quiet_transformers():
            config = AutoConfig.from_pretrained(str(checkpoint.root), local_files_only=True, trust_remote_code=False)
            # Buffers stay real: rotary frequencies and the like are computed in __init__, not loaded.
            with init_empty_weights(include_buffers=False):
                cls = auto_model_class(checkpoint.config)
                if hasattr(cls, "from_config"):
                    model = cls.from_config(config, dtype=dtype, trust_remote_code=False)
                else:  # a concrete class the registry recorded (a multimodal wrapper)
                    model = cls._from_config(config, dtype=dtype)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError) as exc:
        raise ModelLoadError(
            f"transformers cannot build the model of {checkpoint.name}: {first_line(exc)}",
            hint="rerun with MOETOOL_DEBUG=1 for details",
            code="MODEL_LOAD_FAILED",
        ) from None
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def decoder_layer_paths(model: Any) -> list[str]:
    """Module paths of the decoder layers, in execution order (an encoder's before a decoder's).

    transformers lists a model's layer classes in ``_no_split_modules`` (the unit accelerate never
    splits across devices): the layers are the modules of those classes that sit in a ``ModuleList``.

    Raises:
        UnsupportedArchitectureError: no decoder layers found.
    """
    from torch import nn

    classes = set(getattr(model, "_no_split_modules", None) or [])
    paths: list[str] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList):
            continue
        children = list(module.children())
        if children and all(type(child).__name__ in classes for child in children):
            paths += [f"{name}.{index}" for index in range(len(children))]
    if not paths:
        raise UnsupportedArchitectureError(
            f"cannot find the decoder layers of this {type(model).__name__} model",
            hint="the layer-streamed runner needs a model whose layers sit in a ModuleList; pass --whole-model",
        )
    return paths


def _module_path(model: Any, module: Any) -> str | None:
    if module is None:
        return None
    for name, candidate in model.named_modules():
        if candidate is module:
            return name
    return None


@dataclass
class Piece:
    """Checkpoint tensors that load together, and the model entries (parameters, buffers) they fill.

    Attributes:
        name: ``embed``, ``globals``, ``head`` or ``layer:<path>``.
        sources: checkpoint tensor names.
        targets: model entries the sources fill.
        aliases: model entries tied to an entry of another piece (a tied lm_head): filled by sharing it.
    """

    name: str
    sources: list[str] = field(default_factory=list)
    targets: set[str] = field(default_factory=set)
    aliases: dict[str, str] = field(default_factory=dict)

    def stored_bytes(self, checkpoint: Checkpoint) -> int:
        return sum(checkpoint.tensors[name].nbytes for name in self.sources)


class WeightPlan:
    """Which checkpoint tensors fill which part of the skeleton, and how to load and release each part.

    Args:
        model: the skeleton from :func:`build_skeleton`.
        checkpoint: the opened checkpoint.
        dtype: the dtype weights are loaded in (the skeleton's).

    Attributes:
        layer_paths: decoder layers in execution order.
        pieces: by name: ``embed``, ``layer:<path>`` for each layer, ``head``, ``globals``.
        unused: checkpoint tensors the model has no place for (DeepSeek-V3's MTP layer, for example).
    """

    def __init__(self, model: Any, checkpoint: Checkpoint, dtype: torch.dtype) -> None:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            dot_natural_key,
            rename_source_key,
        )

        self.model = model
        self.checkpoint = checkpoint
        self.dtype = dtype
        self.mapping = get_model_conversion_mapping(model)
        self.layer_paths = decoder_layer_paths(model)
        state = model.state_dict()
        self.non_persistent = self._non_persistent_buffers()
        self.embed_path = _module_path(model, model.get_input_embeddings())
        self.head_path = _module_path(model, model.get_output_embeddings())

        self.pieces: dict[str, Piece] = {name: Piece(name) for name in (EMBED, GLOBALS, HEAD)}
        for path in self.layer_paths:
            self.pieces[f"layer:{path}"] = Piece(f"layer:{path}")
        # Renaming is stateful for some transforms (guard patterns): plan on a copy, in transformers' order.
        mapping = copy.deepcopy(self.mapping)
        renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in mapping if isinstance(m, WeightConverter)]
        self.unused: list[str] = []
        self.sources_of: dict[str, list[str]] = {}
        for source in sorted(checkpoint.tensors, key=dot_natural_key):
            target, _ = rename_source_key(source, renamings, converters, model.base_model_prefix, state)
            if target not in state and source in state:
                target = source
            if target not in state:
                self.unused.append(source)
                continue
            self.sources_of.setdefault(target, []).append(source)
            self.pieces[self._piece_of(target)].sources.append(source)

        # Tied entries: the one the checkpoint stores provides, the other shares it (symmetric, like
        # transformers' tie_weights during from_pretrained). Both stored: both load, nothing is shared.
        self.aliases: dict[str, str] = {}
        for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
            has_target, has_source = target in self.sources_of, source in self.sources_of
            if has_source and not has_target:
                self.aliases[target] = source
            elif has_target and not has_source:
                self.aliases[source] = target
        for entry in state:
            piece = self.pieces[self._piece_of(entry)]
            if entry in self.aliases:
                piece.aliases[entry] = self.aliases[entry]
            else:
                piece.targets.add(entry)
        self.loaded: set[str] = set()

    def _piece_of(self, target: str) -> str:
        for path in self.layer_paths:
            if target.startswith(path + "."):
                return f"layer:{path}"
        if self.embed_path and target.startswith(self.embed_path + "."):
            return EMBED
        if self.head_path and target.startswith(self.head_path + "."):
            return HEAD
        return GLOBALS

    def _non_persistent_buffers(self) -> set[str]:
        out: set[str] = set()
        for name, module in self.model.named_modules():
            for buffer in getattr(module, "_non_persistent_buffers_set", ()):
                out.add(f"{name}.{buffer}" if name else buffer)
        return out

    def layer_piece(self, path: str) -> Piece:
        return self.pieces[f"layer:{path}"]

    def piece_bytes(self, piece: Piece) -> int:
        """Bytes of a piece's weights as stored (tied entries not counted twice)."""
        return piece.stored_bytes(self.checkpoint)

    # ------------------------------------------------------------------ loading

    def load(self, piece: Piece, device: torch.device) -> None:
        """Read a piece's tensors from the checkpoint (lazily, shard by shard) into the skeleton on ``device``.

        Raises:
            CheckpointError: ``WEIGHTS_MISMATCH`` (missing, unexpected or mis-shaped tensors),
                ``SHARD_UNREADABLE``.
        """
        import torch

        if device.type == "cuda" and device.index is None:  # a bare "cuda" is not a placement everywhere
            device = torch.device("cuda", torch.cuda.current_device())
        narrowed = self._narrow(piece)
        missing = self._load_sources(piece.name, piece.sources, device)
        self._widen(narrowed)
        self._check_loaded(piece, missing)
        self._move_buffers(piece, device)
        self.loaded.add(piece.name)
        for alias, provider in piece.aliases.items():
            tensor = self._entry(provider)
            if tensor.device.type == "meta" or tensor.device != device:
                self._load_sources(f"tied {provider}", self.sources_of[provider], device)
                tensor = self._entry(provider)
            self._set_entry(alias, tensor)

    def _narrow(self, piece: Piece) -> list[str]:
        """Let transformers load a piece in its stored dtype when that is narrower than the compute dtype.

        transformers converts in the dtype of the model's (meta) parameter: a bfloat16 checkpoint run in
        float32 would have its experts stacked and concatenated in float32, twice the transient memory.
        The piece's parameters are made bfloat16 (meta) for the load, then widened one at a time
        (:meth:`_widen`): the same values, half the peak.
        """
        import torch

        stored = {self.checkpoint.tensors[name].dtype for name in piece.sources}
        narrow = {"BF16": torch.bfloat16, "F16": torch.float16}
        if len(stored) != 1 or next(iter(stored)) not in narrow or self.dtype != torch.float32:
            return []
        load_dtype = narrow[next(iter(stored))]
        swapped = []
        for target in piece.targets:
            module_path, _, attr = target.rpartition(".")
            module = self.model.get_submodule(module_path) if module_path else self.model
            param = module._parameters.get(attr)
            if param is not None and param.device.type == "meta" and param.dtype == self.dtype:
                module._parameters[attr] = torch.nn.Parameter(
                    torch.empty(param.shape, dtype=load_dtype, device="meta"), requires_grad=False
                )
                swapped.append(target)
        return swapped

    def _widen(self, targets: list[str]) -> None:
        import torch

        for target in targets:
            module_path, _, attr = target.rpartition(".")
            module = self.model.get_submodule(module_path) if module_path else self.model
            param = module._parameters[attr]
            widened = param.detach().to(self.dtype)
            module._parameters[attr] = torch.nn.Parameter(widened, requires_grad=False)
            del param, widened

    def _load_sources(self, what: str, sources: list[str], device: torch.device) -> set[str]:
        """Load some checkpoint tensors through transformers' conversion; returns the model's missing keys."""
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        from moetool.modeling import quiet_transformers

        if not sources:
            return set(self.model.state_dict())
        config = LoadStateDictConfig(
            device_map={"": device},
            dtype=self.dtype,
            dtype_plan=self.model._get_dtype_plan(self.dtype),
            weight_mapping=copy.deepcopy(self.mapping),
        )
        with self.checkpoint.open_slices(sources) as slices, quiet_transformers():
            try:
                info, _ = convert_and_load_state_dict_in_model(self.model, slices, config)
            except (RuntimeError, ValueError, KeyError, TypeError) as exc:
                raise CheckpointError(
                    f"cannot load {what} of {self.checkpoint.name}: {exc}",
                    hint="the checkpoint's tensors do not match its config.json",
                    code="WEIGHTS_MISMATCH",
                ) from None
        problems = []
        if info.unexpected_keys:
            problems.append(f"unexpected {_listing(info.unexpected_keys)}")
        if info.mismatched_keys:
            problems.append(f"wrong shape {_listing(k[0] for k in info.mismatched_keys)}")
        if info.conversion_errors:
            problems.append(f"conversion failed for {_listing(info.conversion_errors)}")
        if problems:
            raise CheckpointError(
                f"the weights of {self.checkpoint.name} do not match its config ({what}): {'; '.join(problems)}",
                hint="the checkpoint is incomplete, or its config.json belongs to another model: re-create it",
                code="WEIGHTS_MISMATCH",
            )
        return info.missing_keys

    def _check_loaded(self, piece: Piece, missing_in_model: set[str]) -> None:
        missing = [t for t in piece.targets if t in missing_in_model and t not in self.non_persistent]
        if missing:
            raise CheckpointError(
                f"the weights of {self.checkpoint.name} do not match its config: missing {_listing(missing)}",
                hint="the checkpoint is incomplete, or its config.json belongs to another model: re-create it",
                code="WEIGHTS_MISMATCH",
            )

    def _entry(self, name: str) -> Any:
        module_path, _, attr = name.rpartition(".")
        module = self.model.get_submodule(module_path) if module_path else self.model
        return getattr(module, attr)

    def _set_entry(self, name: str, tensor: Any) -> None:
        module_path, _, attr = name.rpartition(".")
        module = self.model.get_submodule(module_path) if module_path else self.model
        if attr in module._parameters:
            module._parameters[attr] = tensor
        else:
            module._buffers[attr] = tensor

    def _move_buffers(self, piece: Piece, device: torch.device) -> None:
        """Computed (non-persistent) buffers of the piece follow its weights to the device."""
        for target in piece.targets & self.non_persistent:
            module_path, _, name = target.rpartition(".")
            module = self.model.get_submodule(module_path) if module_path else self.model
            buffer = module._buffers.get(name)
            if buffer is not None and buffer.device != device:
                module._buffers[name] = buffer.to(device)

    def release(self, piece: Piece) -> None:
        """Give a piece's weight memory back: its parameters and loaded buffers become meta tensors again."""
        self.loaded.discard(piece.name)
        for target in piece.targets:
            if target not in self.non_persistent:
                _set_meta(self.model, target)
        for alias, provider in piece.aliases.items():
            _set_meta(self.model, alias)
            if self._piece_of(provider) not in self.loaded:
                _set_meta(self.model, provider)
        release_heap()


def _set_meta(model: Any, entry: str) -> None:
    """Replace a parameter or buffer by an empty meta tensor of the same shape (frees its memory)."""
    import torch

    module_path, _, name = entry.rpartition(".")
    module = model.get_submodule(module_path) if module_path else model
    if name in module._parameters and module._parameters[name] is not None:
        old = module._parameters[name]
        if old.device.type != "meta":
            module._parameters[name] = torch.nn.Parameter(torch.empty_like(old, device="meta"), requires_grad=False)
    elif name in module._buffers and module._buffers[name] is not None and module._buffers[name].device.type != "meta":
        module._buffers[name] = torch.empty_like(module._buffers[name], device="meta")


_LAYER_INDEX = re.compile(r"(\d+)$")


def layer_index(path: str) -> int:
    """The index a decoder-layer path ends with (``model.layers.7`` -> 7)."""
    match = _LAYER_INDEX.search(path)
    return int(match.group(1)) if match else -1
