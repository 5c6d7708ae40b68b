"""Loading a checkpoint as a runnable transformers model and tokenizer: the one way every command does it.

:func:`load_model` resolves the source with :func:`moetool.io.source.open_model` (local folder, Hugging
Face cache or Hub repo; validated headers; pickle refused), loads the tokenizer first (cheap, and a
missing tokenizer is then reported before gigabytes of weights are read), then the weights with
``AutoModelForCausalLM.from_pretrained(..., local_files_only=True, trust_remote_code=False)``, and
refuses a model whose weights do not match its config (missing, unexpected or mis-shaped tensors).

Quantized checkpoints: :data:`LOADERS` maps a ``quantization_config.quant_method`` to the function
that loads it; methods not listed go through transformers itself (which knows GPTQ, AWQ, FP8,
MXFP4, compressed-tensors, ... when their packages are installed).

torch and transformers are imported inside the functions, never at module import.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moetool.errors import (
    CheckpointError,
    MissingDependencyError,
    ModelLoadError,
    MoetoolError,
    UnsupportedArchitectureError,
    UsageError,
    first_line,
)

if TYPE_CHECKING:
    import torch

    from moetool.io.checkpoint import Checkpoint

#: What ``--device`` accepts (checked before torch is imported).
DEVICE_RE = re.compile(r"^(auto|cpu|mps|(cuda|xpu)(:\d+)?)$")

#: ``--dtype`` names and aliases -> torch dtype attribute names ("auto" is decided by :func:`resolve_dtype`).
DTYPES: dict[str, str] = {
    "auto": "auto",
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}

#: ``--device-map`` values: None (one device) or an accelerate placement strategy.
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")

#: Files of which at least one must be present for a checkpoint to have a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model")

#: A string whose token ids tell two tokenizers apart: words, digits, punctuation, accents, CJK,
#: whitespace runs and code.
TOKENIZER_PROBE = (
    "The quick brown fox, 1234567 naïve café — 東京タワー 你好 !?\n\t  def f(x): return x**2  # ok\n"
    "Ünïcödé ß ø œ ﬁ 🙂 https://example.com/a?b=c"
)

#: A loader builds ``(model, tokenizer)`` for a checkpoint; see :func:`register_loader`.
Loader = Callable[..., Any]

#: quant_method -> loader, for quantized formats transformers cannot load by itself (moetool's own).
#: Methods not listed use :func:`load_weights_transformers`.
LOADERS: dict[str, Loader] = {}

#: Loaders that live in moetool's own subpackages: quant_method -> (module, function), imported on
#: first use so that importing this module stays light.
BUILTIN_LOADERS: dict[str, tuple[str, str]] = {
    "moetool": ("moetool.quantize.loader", "load_quantized"),
    "compressed-tensors": ("moetool.quantize.loader", "load_compressed_tensors"),
}


def register_loader(quant_method: str, loader: Loader) -> None:
    """Make ``loader`` load the checkpoints whose ``quantization_config.quant_method`` is ``quant_method``.

    Args:
        quant_method: the value in config.json's ``quantization_config``.
        loader: called as ``loader(checkpoint, dtype=..., device=..., device_map=...)`` and returning the
            model in eval mode.
    """
    LOADERS[quant_method] = loader


def quant_method_of(config: dict[str, Any]) -> str | None:
    """The ``quantization_config.quant_method`` of a config.json, if any."""
    quant = config.get("quantization_config")
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    return method if isinstance(method, str) else None


def loader_for(config: dict[str, Any]) -> Loader:
    """The function that loads a checkpoint with this config (the registry, else transformers)."""
    method = quant_method_of(config)
    if method in BUILTIN_LOADERS and method not in LOADERS:
        import importlib

        module, function = BUILTIN_LOADERS[method]
        register_loader(method, getattr(importlib.import_module(module), function))
    return LOADERS.get(method, load_weights_transformers) if method else load_weights_transformers


# ----------------------------------------------------------------------------- devices and dtypes


def check_device_name(device: str) -> str:
    """Check the spelling of ``--device`` without importing torch.

    Raises:
        UsageError: not ``auto``, ``cpu``, ``mps``, ``cuda[:N]`` or ``xpu[:N]``.
    """
    name = device.strip().lower()
    if not DEVICE_RE.match(name):
        raise UsageError(
            f"unknown --device {device!r}", hint="use auto, cpu, cuda, cuda:N or mps", code="DEVICE_INVALID"
        )
    return name


def check_dtype_name(dtype: str) -> str:
    """Check ``--dtype`` without importing torch; returns the canonical name.

    Raises:
        UsageError: not one of auto, float32, bfloat16, float16 (or their short forms).
    """
    name = DTYPES.get(dtype.strip().lower())
    if name is None:
        raise UsageError(
            f"unknown --dtype {dtype!r}", hint="use auto, float32, bfloat16 or float16", code="DTYPE_INVALID"
        )
    return name


def check_device_map(device_map: str | None) -> str | None:
    """Normalise ``--device-map``: ``none`` -> None, else an accelerate strategy.

    Raises:
        UsageError: an unknown value.
    """
    if device_map is None or device_map.strip().lower() in ("", "none"):
        return None
    name = device_map.strip().lower()
    if name not in DEVICE_MAPS:
        raise UsageError(
            f"unknown --device-map {device_map!r}",
            hint="use none (one device) or auto (spread over GPUs, then CPU memory)",
            code="DEVICE_MAP_INVALID",
        )
    return name


def resolve_device(device: str = "auto") -> torch.device:
    """Turn ``--device`` into a torch device that exists on this machine.

    Args:
        device: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:N``, ``mps``, ``xpu``.

    Returns:
        The device.

    Raises:
        UsageError: a misspelt device, or one this machine does not have.
    """
    import torch

    name = check_device_name(device)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and os.environ.get("LOCAL_RANK", "").isdigit():
        # One process per GPU (accelerate launch / torchrun): each takes its own.
        name = f"cuda:{int(os.environ['LOCAL_RANK']) % max(1, torch.cuda.device_count())}"
    resolved = torch.device(name)
    kind = resolved.type
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"--device {device}: no CUDA GPU is available here",
                hint="use --device cpu (or auto)",
                code="DEVICE_UNAVAILABLE",
            )
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise UsageError(
                f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)",
                hint="use cuda:0 .. cuda:N-1, or auto",
                code="DEVICE_UNAVAILABLE",
            )
    elif kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError(
            f"--device {device}: MPS is not available here", hint="use --device cpu", code="DEVICE_UNAVAILABLE"
        )
    elif kind == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise UsageError(
            f"--device {device}: no XPU is available here", hint="use --device cpu", code="DEVICE_UNAVAILABLE"
        )
    return resolved


def resolve_dtype(dtype: str = "auto", device: torch.device | str | None = None) -> torch.dtype | str:
    """Turn ``--dtype`` into what ``from_pretrained(dtype=...)`` takes.

    ``auto`` is float32 on the CPU (bfloat16 and float16 matrix products there are slow and lose
    precision that a quality measurement should not lose) and the checkpoint's own dtype on an
    accelerator (transformers' ``"auto"``).

    Args:
        dtype: ``auto``, ``float32``, ``bfloat16`` or ``float16`` (or fp32, bf16, fp16, half).
        device: the device the model will run on; ``None`` means ``resolve_device("auto")``.

    Returns:
        A torch dtype, or the string ``"auto"``.

    Raises:
        UsageError: an unknown dtype, or bfloat16 on a GPU without bfloat16 support.
    """
    import torch

    name = check_dtype_name(dtype)
    device = resolve_device("auto") if device is None else torch.device(device)
    if name == "auto":
        return torch.float32 if device.type == "cpu" else "auto"
    if name == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError(
            "--dtype bfloat16: this GPU does not support bfloat16",
            hint="use --dtype float16 or float32",
            code="DTYPE_INVALID",
        )
    return getattr(torch, name)


def model_device(model: Any) -> torch.device:
    """Where a model's inputs go: the device of its input embedding (also under ``device_map``)."""
    embeddings = model.get_input_embeddings()
    return embeddings.weight.device


# ----------------------------------------------------------------------------- loading


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load report and progress bars (moetool reports problems itself).

    With ``MOETOOL_DEBUG=1`` nothing is silenced, so the full load report shows.
    """
    from transformers.utils import logging

    if os.environ.get("MOETOOL_DEBUG", "").strip().lower() not in ("", "0", "false", "no"):
        yield
        return
    verbosity = logging.get_verbosity()
    bars = logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


def open_checkpoint(
    spec: str,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    offline: bool | None = None,
) -> Checkpoint:
    """Resolve ``MODEL`` to a local checkpoint with its weights (downloading from the Hub if needed).

    Raises:
        MoetoolError: whatever :func:`moetool.io.source.open_model` raises; ``CheckpointError`` when the
            checkpoint has no safetensors weights.
    """
    from moetool.io.source import open_model
    from moetool.validate import check_transformers_config

    checkpoint = open_model(spec, revision=revision, token=token, offline=offline, need_weights=True)
    check_transformers_config(checkpoint)  # its strict config classes: one line, not a traceback
    if checkpoint.root is None or not checkpoint.shards:
        raise CheckpointError(
            f"{checkpoint.name} has no safetensors weights to run",
            hint="pass a checkpoint folder with its *.safetensors files",
            code="WEIGHTS_MISSING",
        )
    return checkpoint


def load_tokenizer(checkpoint: Checkpoint) -> Any:
    """Load the tokenizer stored with a checkpoint.

    Raises:
        ModelLoadError: ``TOKENIZER_MISSING`` when the folder holds no tokenizer files,
            ``TOKENIZER_INVALID`` when transformers cannot load them.
    """
    root = Path(checkpoint.root) if checkpoint.root is not None else None
    if root is None or not (any((root / f).exists() for f in TOKENIZER_FILES) or any(root.glob("*.tiktoken"))):
        raise ModelLoadError(
            f"{checkpoint.name} has no tokenizer files (tokenizer.json, tokenizer_config.json, ...)",
            hint="pass a checkpoint that ships its tokenizer files, or copy them from the base model into the folder",
            code="TOKENIZER_MISSING",
        )
    from transformers import AutoTokenizer

    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(str(root), local_files_only=True, trust_remote_code=False)
    except ImportError as exc:
        raise MissingDependencyError(
            f"the tokenizer of {checkpoint.name} needs a package that is not installed: {first_line(exc)}",
            hint="install the package it names (often: pip install sentencepiece, or tiktoken)",
        ) from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelLoadError(
            f"cannot load the tokenizer of {checkpoint.name}: {first_line(exc)}",
            hint="check the tokenizer files; rerun with MOETOOL_DEBUG=1 for details",
            code="TOKENIZER_INVALID",
        ) from None


def auto_model_class(config: dict[str, Any]) -> Any:
    """The transformers class that runs a config.json: the exact class the registry recorded for a
    derived family (a multimodal wrapper loads as its image-text-to-text class, where the registry found
    its routers), else causal LM, else sequence-to-sequence LM for encoder-decoder models (Switch
    Transformers, NLLB-MoE), else image-text-to-text; causal LM when transformers names none of them."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    registered = _registry_class(config)
    if registered is not None:
        return registered
    model_type = config.get("model_type")
    if _mapped(model_type, "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"):
        return AutoModelForCausalLM
    if config.get("is_encoder_decoder") or _seq2seq_class(model_type):
        return AutoModelForSeq2SeqLM
    if _mapped(model_type, "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES"):
        return transformers.AutoModelForImageTextToText
    return AutoModelForCausalLM


def _mapped(model_type: Any, mapping: str) -> str | None:
    from transformers.models.auto import modeling_auto

    return getattr(modeling_auto, mapping, {}).get(model_type) if isinstance(model_type, str) else None


def _seq2seq_class(model_type: Any) -> str | None:
    return _mapped(model_type, "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES")


def _registry_class(config: dict[str, Any]) -> Any:
    """The exact class the derived registry recorded for this model type, else None."""
    import transformers

    from moetool.arch.registry import family_for_config

    try:
        name = family_for_config(config).model_class
    except MoetoolError:
        return None
    return getattr(transformers, name, None) if name else None


def check_transformers_support(checkpoint: Checkpoint) -> None:
    """Refuse, before reading weights, a model_type transformers has no language-model class for.

    Raises:
        ModelLoadError: ``REMOTE_CODE_REFUSED`` for a checkpoint that needs its own Python code.
        UnsupportedArchitectureError: any other model_type transformers cannot run as a causal or
            sequence-to-sequence LM.
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = checkpoint.config.get("model_type")
    if any(
        _mapped(model_type, m)
        for m in (
            "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES",
            "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES",
            "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
        )
    ):
        return
    if "auto_map" in checkpoint.config:
        raise ModelLoadError(
            f"{checkpoint.name} (model_type {model_type!r}) needs its own Python code (auto_map), which moetool "
            "never runs",
            hint="use a checkpoint of a family that transformers implements natively",
            code="REMOTE_CODE_REFUSED",
        )
    known = isinstance(model_type, str) and model_type in CONFIG_MAPPING
    why = "has no causal-LM class for" if known else "does not know"
    raise UnsupportedArchitectureError(
        f"the installed transformers {why} model_type {model_type!r} ({checkpoint.name})",
        hint="moetool runs models through transformers' AutoModelForCausalLM; upgrade transformers, or use a "
        "supported family",
    )


def _listing(names: set[Any] | list[Any]) -> str:
    names = sorted(str(n[0] if isinstance(n, tuple) else n) for n in names)
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def load_weights_transformers(
    checkpoint: Checkpoint,
    *,
    dtype: Any,
    device: torch.device,
    device_map: str | None = None,
    config: Any = None,
) -> Any:
    """Build the model with ``AutoModelForCausalLM.from_pretrained`` from a local checkpoint folder.

    Args:
        checkpoint: an opened checkpoint with a local root.
        dtype: a torch dtype or ``"auto"`` (see :func:`resolve_dtype`).
        device: the device to put the model on (ignored with ``device_map``).
        device_map: None (the whole model on ``device``) or an accelerate strategy such as ``auto``.
        config: a transformers config to use instead of the folder's config.json (quantized loaders).

    Returns:
        The model, in eval mode.

    Raises:
        CheckpointError: ``WEIGHTS_MISMATCH`` when tensors are missing, unexpected or mis-shaped.
        MissingDependencyError: a package the model (or its quantization) needs is not installed.
        ModelLoadError: any other failure of transformers.
    """
    import torch

    check_transformers_support(checkpoint)
    kwargs: dict[str, Any] = {} if config is None else {"config": config}
    if device_map is not None:
        kwargs["device_map"] = device_map
    elif device.type != "cpu":
        # Straight onto the accelerator, tensor by tensor: no full copy in CPU memory first. An explicit
        # index, because a bare "cuda" is not a placement accelerate accepts everywhere.
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        kwargs["device_map"] = {"": device}
    try:
        with quiet_transformers():
            model, info = auto_model_class(checkpoint.config).from_pretrained(
                str(checkpoint.root),
                dtype=dtype,
                local_files_only=True,
                trust_remote_code=False,
                use_safetensors=True,
                output_loading_info=True,
                # Mis-shaped tensors are then reported in `info` (and refused below) instead of raising
                # an error that only points at a log record.
                ignore_mismatched_sizes=True,
                # transformers 5.25 turns hub kernels on by default on CUDA, which needs the `kernels`
                # package and the network ("Kernels are not available" offline): moetool loads models
                # the same way everywhere, with transformers' own implementations.
                use_kernels=False,
                **kwargs,
            )
    except ImportError as exc:
        raise MissingDependencyError(
            f"loading {checkpoint.name} needs a package that is not installed: {first_line(exc)}",
            hint="install the package it names",
        ) from None
    except MoetoolError:
        raise
    except torch.cuda.OutOfMemoryError:
        raise ModelLoadError(
            f"{checkpoint.name} does not fit in the memory of {device}",
            hint="pass --device-map auto to spread it over the GPUs and CPU memory, or a smaller --dtype",
            code="OUT_OF_MEMORY",
        ) from None
    except (OSError, ValueError, RuntimeError, KeyError, TypeError, AttributeError) as exc:
        raise ModelLoadError(
            f"transformers cannot load {checkpoint.name}: {first_line(exc)}",
            hint="rerun with MOETOOL_DEBUG=1 for transformers' load report",
            code="MODEL_LOAD_FAILED",
        ) from None
    problems = []
    if info.get("missing_keys"):
        problems.append(f"missing {_listing(info['missing_keys'])}")
    if info.get("unexpected_keys"):
        problems.append(f"unexpected {_listing(info['unexpected_keys'])}")
    if info.get("mismatched_keys"):
        problems.append(f"wrong shape {_listing(info['mismatched_keys'])}")
    if problems:
        raise CheckpointError(
            f"the weights of {checkpoint.name} do not match its config: {'; '.join(problems)}",
            hint="the checkpoint is incomplete, or its config.json belongs to another model: re-create it",
            code="WEIGHTS_MISMATCH",
        )
    model.eval()
    return model


def load_weights(
    checkpoint: Checkpoint,
    *,
    device: str = "auto",
    dtype: str = "auto",
    device_map: str | None = None,
) -> Any:
    """Load a checkpoint's model through the loader its quantization needs (see :data:`LOADERS`).

    Args:
        checkpoint: from :func:`open_checkpoint`.
        device: see :func:`resolve_device`.
        dtype: see :func:`resolve_dtype`.
        device_map: ``None``/``"none"`` or an accelerate strategy (``"auto"``) for models that do not
            fit one device.

    Returns:
        The model in eval mode.
    """
    device_map = check_device_map(device_map)
    resolved_device = resolve_device(device)
    resolved_dtype = resolve_dtype(dtype, resolved_device)
    loader = loader_for(checkpoint.config)
    return loader(checkpoint, dtype=resolved_dtype, device=resolved_device, device_map=device_map)


def load_model(
    path: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    revision: str | None = None,
    token: str | bool | None = None,
    device_map: str | None = None,
    offline: bool | None = None,
) -> Any:
    """Load a checkpoint as a transformers model, including moetool-quantized ones (``moetool.load_model``).

    A checkpoint written by ``moetool quantize`` comes back as the family's transformers model whose
    quantized experts (and linears) keep their packed codes and dequantize on the fly; any other
    checkpoint loads through transformers' ``AutoModelForCausalLM``. :func:`load_model_and_tokenizer`
    loads the tokenizer too.

    Args:
        path: a local checkpoint folder, or a Hugging Face Hub repo id.
        device: ``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda[:N]``, ``mps``.
        dtype: ``auto`` (float32 on CPU, the checkpoint's dtype on GPU), ``float32``, ``bfloat16``,
            ``float16``.
        revision / token / offline: Hub access for a repo id.
        device_map: ``None`` or an accelerate strategy such as ``"auto"``.

    Returns:
        The model, in eval mode.

    Raises:
        moetool.errors.MoetoolError: a missing or invalid checkpoint, a bad option, a failed load.
    """
    checkpoint = open_checkpoint(path, revision=revision, token=token, offline=offline)
    return load_weights(checkpoint, device=device, dtype=dtype, device_map=device_map)


def load_model_and_tokenizer(
    spec: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    revision: str | None = None,
    token: str | bool | None = None,
    device_map: str | None = None,
    offline: bool | None = None,
) -> tuple[Any, Any, Checkpoint]:
    """Load ``MODEL`` (local folder, Hugging Face cache or Hub repo) as a model and its tokenizer.

    Args:
        spec: what the user typed as ``MODEL``.
        device: ``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda[:N]``, ``mps``.
        dtype: ``auto`` (float32 on CPU, the checkpoint's dtype on GPU), ``float32``, ``bfloat16``,
            ``float16``.
        revision: a Hub branch, tag or commit.
        token: the Hub token (see :func:`moetool.io.source.open_model`).
        device_map: ``None`` or ``"auto"`` (accelerate places the layers over the GPUs, then CPU memory).
        offline: never touch the network.

    Returns:
        ``(model, tokenizer, checkpoint)``; the model is in eval mode.

    Raises:
        UsageError: a bad device, dtype or device map.
        ModelLoadError: no tokenizer, remote code, or transformers failing.
        UnsupportedArchitectureError: a model_type transformers cannot run.
        CheckpointError: weights that do not match the config; whatever opening the source raises.
    """
    check_device_name(device)
    check_dtype_name(dtype)
    check_device_map(device_map)
    checkpoint = open_checkpoint(spec, revision=revision, token=token, offline=offline)
    tokenizer = load_tokenizer(checkpoint)
    model = load_weights(checkpoint, device=device, dtype=dtype, device_map=device_map)
    return model, tokenizer, checkpoint


def check_same_tokenizer(tokenizer: Any, other: Any, *, names: tuple[str, str] = ("MODEL", "the reference")) -> None:
    """Refuse two tokenizers that would map the same text to different ids.

    Compared: the vocabulary size (with added tokens), the ids of a probe string mixing scripts,
    digits, whitespace and code, and the end-of-sequence id.

    Raises:
        ModelLoadError: ``TOKENIZER_MISMATCH``, saying what differs.
    """
    first, second = names
    hint = "compare models that share a tokenizer (the same base model)"
    if len(tokenizer) != len(other):
        raise ModelLoadError(
            f"{first} and {second} have different tokenizers: {len(tokenizer)} vs {len(other)} tokens",
            hint=hint,
            code="TOKENIZER_MISMATCH",
        )
    ids = tokenizer(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
    other_ids = other(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
    if list(ids) != list(other_ids):
        raise ModelLoadError(
            f"{first} and {second} have different tokenizers: they split the same text into different tokens",
            hint=hint,
            code="TOKENIZER_MISMATCH",
        )
    if tokenizer.eos_token_id != other.eos_token_id:
        raise ModelLoadError(
            f"{first} and {second} have different end-of-sequence tokens "
            f"({tokenizer.eos_token_id} vs {other.eos_token_id})",
            hint=hint,
            code="TOKENIZER_MISMATCH",
        )
