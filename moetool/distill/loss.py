"""The distillation loss: KL(teacher || student) at a temperature, mixed with cross-entropy on the data.

For the positions ``i`` that have a next token (``mask``), with ``p`` the teacher's and ``q`` the student's
softmax at temperature ``T``::

    kd   = T^2 * mean_i KL(p_i || q_i)                  (Hinton et al. 2015: T^2 keeps the gradient scale)
    ce   = mean_i -log softmax(student_i)[label_i]      (at temperature 1)
    loss = alpha * kd + (1 - alpha) * ce

:func:`topk_kd_loss` computes the same KL from a cached teacher: the top-k log-probabilities per position
and the log of the probability mass outside them. The k tokens are compared one by one and the rest as
one bucket (the student's mass outside the same k tokens), so the value is exact for k = vocabulary size
and a close lower bound of the full KL otherwise (merging outcomes never increases a KL).

Everything is computed in float32 whatever the logits' dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass
class LossParts:
    """One batch's loss (with gradient) and its detached parts for reporting.

    Attributes:
        loss: ``alpha * kd + (1 - alpha) * ce``, the value to backpropagate.
        kd: the KD term, ``T^2 * KL`` (0 when alpha is 0 and there is no teacher).
        ce: the cross-entropy on the data labels.
        tokens: the number of positions averaged over.
    """

    loss: torch.Tensor
    kd: float
    ce: float
    tokens: int


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weight = mask.to(values.dtype)
    # clamp: a batch without a scored position gives 0, not NaN.
    return (values * weight).sum() / weight.sum().clamp(min=1.0)


def cross_entropy(
    student_logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, *, log_q: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean next-token cross-entropy over the masked positions (``labels`` already shifted).

    ``log_q``: the student's log-softmax at temperature 1 when the caller has it already.
    """
    import torch

    if log_q is None:
        log_q = torch.log_softmax(student_logits.float(), dim=-1)
    nll = -log_q.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return _masked_mean(nll, mask)


def kl_per_position(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    *,
    log_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """KL(teacher || student) of the softmaxes at ``temperature``, per position (``[..., V] -> [...]``).

    ``log_q``: the student's log-softmax at ``temperature`` when the caller has it already.
    """
    import torch

    if log_q is None:
        log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = torch.log_softmax(teacher_logits.float() / temperature, dim=-1)
    p = log_p.exp()
    # Where the teacher gives a token zero probability its term is 0 (the limit of p log p), also when a
    # logit is -inf in both models, where the plain product would be 0 * NaN.
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(dim=-1)


def kl_topk_per_position(
    student_logits: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    teacher_indices: torch.Tensor,
    teacher_rest_logprob: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """KL(teacher || student) per position from the teacher's top-k and the mass of the rest.

    Args:
        student_logits: ``[..., V]``.
        teacher_logprobs: ``[..., k]`` the teacher's log-probabilities at ``temperature`` for its top k
            tokens.
        teacher_indices: ``[..., k]`` those tokens' ids.
        teacher_rest_logprob: ``[...]`` the log of the teacher's probability mass outside the k tokens
            (``-inf`` when k is the whole vocabulary).
        temperature: the temperature both distributions are taken at.

    Returns:
        ``[...]`` the KL per position, with the k tokens compared one by one and the rest as one outcome.
    """
    import torch

    scaled = student_logits.float() / temperature
    norm = torch.logsumexp(scaled, dim=-1)
    indices = teacher_indices.long()
    log_q_k = scaled.gather(-1, indices) - norm.unsqueeze(-1)
    log_p_k = teacher_logprobs.float()
    p_k = log_p_k.exp()
    head = torch.where(p_k > 0, p_k * (log_p_k - log_q_k), torch.zeros_like(p_k)).sum(dim=-1)
    # The student's mass outside the teacher's k tokens, as a logsumexp over the other entries: exact and
    # stable where 1 - sum(q_k) would cancel.
    log_q_rest = torch.logsumexp(scaled.scatter(-1, indices, float("-inf")), dim=-1) - norm
    log_p_rest = teacher_rest_logprob.float()
    p_rest = log_p_rest.exp()
    rest = torch.where(p_rest > 0, p_rest * (log_p_rest - log_q_rest), torch.zeros_like(p_rest))
    return head + rest


def kd_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
    teacher_logits: torch.Tensor | None = None,
    teacher_topk: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> LossParts:
    """The mixed loss for one batch.

    Args:
        student_logits: ``[B, T, V]`` at the positions that predict ``labels``.
        labels: ``[B, T]`` the next tokens.
        mask: ``[B, T]`` 1 where the position is scored.
        alpha: weight of the KD term (``1 - alpha`` weighs cross-entropy).
        temperature: the KD temperature.
        teacher_logits: ``[B, T, V]`` the teacher's logits (exact KL), or
        teacher_topk: ``(logprobs [B, T, k], indices [B, T, k], rest_logprob [B, T])`` from the cache.

    Returns:
        The loss and its parts.

    Raises:
        ValueError: ``alpha > 0`` without a teacher, or both teacher forms given.
    """
    import contextlib

    import torch

    if teacher_logits is not None and teacher_topk is not None:
        raise ValueError("give teacher_logits or teacher_topk, not both")
    if alpha > 0 and teacher_logits is None and teacher_topk is None:
        raise ValueError("alpha > 0 needs the teacher's logits or its cached top-k")
    tokens = int(mask.sum())
    # One log-softmax of the student serves both terms at temperature 1 (it is a [B, T, V] pass). With
    # alpha 1 the cross-entropy is only reported, so it needs no graph.
    grad = contextlib.nullcontext() if alpha < 1 else torch.no_grad()
    with grad:
        log_q1 = torch.log_softmax(student_logits.float(), dim=-1)
        ce = cross_entropy(student_logits, labels, mask, log_q=log_q1)
    if alpha == 0:
        return LossParts(loss=ce, kd=0.0, ce=float(ce.detach()), tokens=tokens)
    if teacher_logits is not None:
        shared = log_q1 if temperature == 1 and alpha < 1 else None
        kl = kl_per_position(student_logits, teacher_logits, temperature, log_q=shared)
    else:
        assert teacher_topk is not None
        kl = kl_topk_per_position(student_logits, *teacher_topk, temperature)
    kd = (temperature**2) * _masked_mean(kl, mask)
    loss = alpha * kd + (1 - alpha) * ce if alpha < 1 else kd
    return LossParts(loss=loss, kd=float(kd.detach()), ce=float(ce.detach()), tokens=tokens)
