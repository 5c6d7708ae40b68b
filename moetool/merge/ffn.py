"""Expert math on canonical tensors (see :mod:`moetool.merge.layout`): gated experts
``down(act(gate x) * up x)`` and two-matrix experts ``down(act(up x))``, each projection with an optional
bias (NLLB-MoE's ``fc1``/``fc2``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import torch

    from moetool.merge.layout import Experts


class FFN(NamedTuple):
    """One feed-forward network in canonical form.

    Attributes:
        gate: ``[I, H]``, or ``None`` for a two-matrix MLP.
        up: ``[I, H]``.
        down: ``[H, I]``.
        gate_bias / up_bias: ``[I]`` or ``None``.
        down_bias: ``[H]`` or ``None``.
    """

    gate: torch.Tensor | None
    up: torch.Tensor
    down: torch.Tensor
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None

    @property
    def width(self) -> int:
        """The intermediate size ``I``."""
        return int(self.up.shape[0])

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> FFN:
        """The same FFN with ``fn`` applied to every tensor it has."""
        return FFN(*(None if t is None else fn(t) for t in self))


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation function transformers uses for ``hidden_act`` = ``name``."""
    from transformers.activations import ACT2FN

    return ACT2FN[name]


def _project(weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return x @ weight.T if bias is None else x @ weight.T + bias


def hidden(ffn: FFN, x: torch.Tensor, act: Callable) -> torch.Tensor:
    """Intermediate activations ``act(x gate^T) * (x up^T)`` (``act(x up^T)`` without a gate):
    ``[n, I]`` for ``x`` ``[n, H]``."""
    if ffn.gate is None:
        return act(_project(ffn.up, ffn.up_bias, x))
    return act(_project(ffn.gate, ffn.gate_bias, x)) * _project(ffn.up, ffn.up_bias, x)


def forward(ffn: FFN, x: torch.Tensor, act: Callable) -> torch.Tensor:
    """One FFN on tokens ``x`` ``[n, H]`` -> ``[n, H]``."""
    return _project(ffn.down, ffn.down_bias, hidden(ffn, x, act))


def expert_forward(experts: Experts, index: int, x: torch.Tensor, act: Callable) -> torch.Tensor:
    """Expert ``index`` of a layer on tokens ``x``."""
    return forward(experts.ffn(index), x, act)
