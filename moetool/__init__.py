"""moetool: a toolkit for Mixture-of-Experts checkpoints in the Hugging Face format.

Importing the package is cheap: torch and transformers are imported only by the functions that run
a model or touch tensor data.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "load_model"]


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
    """Load a checkpoint as a transformers model, including moetool-quantized ones.

    A checkpoint written by ``moetool quantize`` comes back as the family's transformers model whose
    quantized experts (and linears) keep their packed codes and dequantize on the fly; any other
    checkpoint loads through transformers' ``AutoModelForCausalLM``.

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
    from moetool.modeling import load_weights, open_checkpoint

    checkpoint = open_checkpoint(path, revision=revision, token=token, offline=offline)
    return load_weights(checkpoint, device=device, dtype=dtype, device_map=device_map)
