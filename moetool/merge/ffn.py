"""SwiGLU expert math on canonical tensors (see :mod:`moetool.merge.layout`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from moetool.merge.layout import Experts


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation function transformers uses for ``hidden_act`` = ``name``."""
    from transformers.activations import ACT2FN

    return ACT2FN[name]


def hidden(gate: torch.Tensor, up: torch.Tensor, x: torch.Tensor, act: Callable) -> torch.Tensor:
    """Intermediate activations ``act(x gate^T) * (x up^T)``: ``[n, I]`` for ``x`` ``[n, H]``."""
    return act(x @ gate.T) * (x @ up.T)


def forward(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, x: torch.Tensor, act: Callable) -> torch.Tensor:
    """One SwiGLU FFN on tokens ``x`` ``[n, H]`` -> ``[n, H]``."""
    return hidden(gate, up, x, act) @ down.T


def expert_forward(experts: Experts, index: int, x: torch.Tensor, act: Callable) -> torch.Tensor:
    """Expert ``index`` of a layer on tokens ``x``."""
    return forward(experts.gate[index], experts.up[index], experts.down[index], x, act)
