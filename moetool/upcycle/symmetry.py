"""Opt-in symmetry breaking of the expert copies: Gaussian noise and Drop-Upcycling re-initialisation.

Both change the model's outputs on purpose (the report says so). Every random draw comes from a
generator seeded by ``(seed, what, layer, copy, role)``, so a run is reproducible whatever order the
tensors are written in, and the gate, up and down tensors of one copy re-initialise the same neurons.
"""

from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def generator(seed: int, *keys: object) -> torch.Generator:
    """A CPU generator seeded from the user's seed and a tuple of keys (stable across processes)."""
    import torch

    mixed = zlib.crc32(":".join(map(str, keys)).encode("utf-8"))
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + mixed) % (2**63))


def reinit_neurons(seed: int, layer: int, copy: int, width: int, ratio: float) -> torch.Tensor:
    """The intermediate neurons Drop-Upcycling re-initialises in one copy (sorted indices)."""
    import torch

    count = round(ratio * width)
    order = torch.randperm(width, generator=generator(seed, "reinit-neurons", layer, copy))
    return order[:count].sort().values


def perturb_copy(
    weight: torch.Tensor,
    *,
    role: int,
    layer: int,
    copy: int,
    noise: float,
    reinit_ratio: float,
    seed: int,
) -> torch.Tensor:
    """One routed copy of a dense MLP tensor, with its symmetry broken.

    Args:
        weight: the dense tensor: ``[D, H]`` for gate (role 0) and up (role 1), ``[H, D]`` for down (2).
        role: which of the three.
        layer / copy: where the copy goes (seeds the draws).
        noise: adds N(0, (noise * std(weight))^2) to every element.
        reinit_ratio: re-initialises that fraction of the intermediate neurons (gate/up rows, down
            columns) from N(mean(weight), std(weight)^2), Drop-Upcycling style.
        seed: the user's seed.

    Returns:
        A new float32 tensor; ``weight`` is not modified.
    """
    import torch

    out = weight.float().clone()
    std, mean = out.std(), out.mean()
    width = out.shape[1] if role == 2 else out.shape[0]
    if reinit_ratio > 0:
        neurons = reinit_neurons(seed, layer, copy, width, reinit_ratio)
        gen = generator(seed, "reinit", layer, copy, role)
        if role == 2:
            out[:, neurons] = torch.randn(out.shape[0], len(neurons), generator=gen) * std + mean
        else:
            out[neurons, :] = torch.randn(len(neurons), out.shape[1], generator=gen) * std + mean
    if noise > 0:
        gen = generator(seed, "noise", layer, copy, role)
        out += torch.randn(out.shape, generator=gen) * (noise * std)
    return out
