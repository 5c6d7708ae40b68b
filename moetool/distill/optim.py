"""The distillation optimizer: AdamW, or bitsandbytes' 8-bit AdamW on CUDA (``--optimizer adamw8bit``).

8-bit AdamW keeps both moments in 8 bits with block-wise scales (bitsandbytes' optimizer kernels), a
quarter of AdamW's float32 state: for a student of P parameters, about 2P bytes instead of 8P. It runs
on CUDA devices only (bitsandbytes' 8-bit optimizer kernels); on the CPU moetool refuses it rather than
fall back silently.
"""

from __future__ import annotations

from typing import Any

from moetool.errors import MissingDependencyError, UsageError

OPTIMIZERS = ("adamw", "adamw8bit")
BETAS = (0.9, 0.95)
EPS = 1e-8


def make_optimizer(name: str, param_groups: Any, lr: float, device: Any) -> Any:
    """The optimizer ``--optimizer`` names, over ``param_groups`` (each with its weight decay).

    Raises:
        UsageError: ``adamw8bit`` on a device other than CUDA; an unknown name.
        MissingDependencyError: ``adamw8bit`` without bitsandbytes.
    """
    import torch

    if name == "adamw":
        return torch.optim.AdamW(param_groups, lr=lr, betas=BETAS, eps=EPS)
    if name != "adamw8bit":
        raise UsageError(f"unknown --optimizer {name!r}", hint=f"use {' or '.join(OPTIMIZERS)}", code="OPTION_INVALID")
    if getattr(device, "type", str(device)) != "cuda":
        raise UsageError(
            f"--optimizer adamw8bit needs a CUDA device, not {device}",
            hint="bitsandbytes' 8-bit optimizer kernels run on CUDA; use --optimizer adamw here",
            code="OPTION_INVALID",
        )
    try:
        import bitsandbytes as bnb
    except Exception:  # ImportError, or its native library failing to load
        raise MissingDependencyError(
            "--optimizer adamw8bit needs bitsandbytes", hint="pip install 'moetool[bnb]'"
        ) from None
    return bnb.optim.AdamW8bit(param_groups, lr=lr, betas=BETAS, eps=EPS)
