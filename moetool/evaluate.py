"""Perplexity of a causal LM on a dataset, and its divergence from a reference model on the same tokens.

The text is packed into windows (:func:`moetool.data.iter_windows`); each window of ``n`` tokens
scores the ``n - 1`` tokens after its first, each predicted from the tokens before it (the usual
causal-LM shift; padding is never scored). Perplexity is ``exp`` of the mean negative log-likelihood
over every scored token of every window, so windows count by their token numbers.

With a reference model, both run on the same batches, and at every scored position::

    KL(reference || model) = sum_v p_ref(v) * (log p_ref(v) - log p_model(v))

is averaged over the positions, as is top-1 agreement (both models' most likely next token is the
same). Log-probabilities are computed in float32 one window at a time (a ``[T, vocab]`` block, not the
whole batch's), and the sums are kept in float64, so memory does not grow with the number of tokens.

torch is imported inside the functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from moetool.data import Document, iter_batches, iter_windows
from moetool.errors import DatasetError, ModelLoadError, MoetoolError, UsageError

SCHEMA_VERSION = 1


@dataclass
class _Sums:
    """Running float64 sums for one domain (Python floats are float64)."""

    tokens: int = 0
    windows: int = 0
    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    ref_nll: float = 0.0

    def add(self, other: _Sums) -> None:
        self.tokens += other.tokens
        self.windows += other.windows
        self.nll += other.nll
        self.kl += other.kl
        self.agree += other.agree
        self.ref_nll += other.ref_nll


def _perplexity(nll: float) -> float:
    # exp overflows float64 above ~709.78 nats/token: only a broken model gets there.
    return math.exp(nll) if nll < 709.0 else math.inf


def _figures(sums: _Sums, with_reference: bool) -> dict[str, Any]:
    nll = sums.nll / sums.tokens if sums.tokens else math.nan
    figures: dict[str, Any] = {
        "tokens": sums.tokens,
        "windows": sums.windows,
        "nll": nll,
        "perplexity": _perplexity(nll) if sums.tokens else math.nan,
    }
    if with_reference:
        figures["kl"] = sums.kl / sums.tokens if sums.tokens else math.nan
        figures["top1_agreement"] = sums.agree / sums.tokens if sums.tokens else math.nan
        figures["reference_perplexity"] = _perplexity(sums.ref_nll / sums.tokens) if sums.tokens else math.nan
    return figures


def _json_number(value: Any) -> Any:
    # JSON has no inf/NaN: an overflowing perplexity is written as null.
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass
class EvalResult:
    """What :func:`evaluate` measured.

    Attributes:
        model: the model's name (path or repo id).
        tokens: scored (predicted) tokens: every window token but the first of each window.
        windows: windows evaluated.
        nll: mean negative log-likelihood per scored token, in nats.
        perplexity: ``exp(nll)`` (``inf`` if that overflows).
        reference: the reference model's name, when there is one.
        kl: mean KL(reference || model) per scored token, in nats.
        top1_agreement: fraction of scored positions where both models' top-1 next token agree.
        reference_perplexity: the reference's own perplexity on the same tokens (from the same pass).
        per_domain: for each domain (when documents have one): tokens, windows, nll, perplexity, and
            kl / top1_agreement with a reference.
        input_tokens: tokens fed to the model (scored tokens plus one per window).
        seq_len: the window length.
        revision: the model's revision (commit sha), when known.
        reference_revision: the reference's revision, when known.
    """

    model: str
    tokens: int
    windows: int
    nll: float
    perplexity: float
    reference: str | None = None
    kl: float | None = None
    top1_agreement: float | None = None
    reference_perplexity: float | None = None
    per_domain: dict[str, dict[str, Any]] = field(default_factory=dict)
    input_tokens: int = 0
    seq_len: int | None = None
    revision: str | None = None
    reference_revision: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The result as a JSON document (``schema_version`` 1; non-finite numbers become null)."""
        return {
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "revision": self.revision,
            "reference": self.reference,
            "reference_revision": self.reference_revision,
            "seq_len": self.seq_len,
            "windows": self.windows,
            "input_tokens": self.input_tokens,
            "tokens": self.tokens,
            "nll": _json_number(self.nll),
            "perplexity": _json_number(self.perplexity),
            "kl": _json_number(self.kl),
            "top1_agreement": _json_number(self.top1_agreement),
            "reference_perplexity": _json_number(self.reference_perplexity),
            "per_domain": {
                domain: {key: _json_number(value) for key, value in figures.items()}
                for domain, figures in self.per_domain.items()
            },
        }


def _model_name(model: Any) -> str:
    return str(getattr(model, "name_or_path", "") or type(model).__name__)


def check_seq_len(config: Any, seq_len: int, name: str) -> None:
    """Refuse windows longer than a model's positions (its config.json as a dict, or a config object).

    Raises:
        UsageError: ``SEQ_LEN_TOO_LONG``.
    """
    if isinstance(config, dict):
        text = config.get("text_config")
        limit = (text if isinstance(text, dict) and "max_position_embeddings" in text else config).get(
            "max_position_embeddings"
        )
    else:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        limit = getattr(text, "max_position_embeddings", None)
    if isinstance(limit, int) and not isinstance(limit, bool) and 0 < limit < seq_len:
        raise UsageError(
            f"--seq-len {seq_len} is longer than {name} supports (max_position_embeddings = {limit})",
            hint=f"pass --seq-len {limit} or less",
            code="SEQ_LEN_TOO_LONG",
        )


def _vocab_rows(model: Any) -> int:
    return int(model.get_input_embeddings().weight.shape[0])


def _as_runner(model: Any) -> Any:
    from moetool.runner.stream import StreamedModel, WholeModel

    return model if isinstance(model, (StreamedModel, WholeModel)) else WholeModel(model)


def evaluate(
    model: Any,
    tokenizer: Any,
    documents: Iterable[Document],
    *,
    seq_len: int = 256,
    batch_size: int = 8,
    max_tokens: int | None = None,
    reference_model: Any = None,
    reference_tokenizer: Any = None,
    progress: Callable[[float], None] | None = None,
    model_name: str | None = None,
    reference_name: str | None = None,
) -> EvalResult:
    """Perplexity of ``model`` on ``documents``; with ``reference_model``, KL and top-1 agreement too.

    Args:
        model: a runner (:class:`moetool.runner.StreamedModel`: one layer at a time;
            :class:`moetool.runner.WholeModel`), or a transformers causal LM in eval mode.
        tokenizer: its tokenizer.
        documents: the texts (e.g. from :func:`moetool.data.load_documents`); consumed lazily.
        seq_len: tokens per window.
        batch_size: windows per forward pass.
        max_tokens: stop after this many input tokens (``None``: all of them).
        reference_model: a second model (or runner) run on the same windows; the result then has
            ``kl`` = mean KL(reference || model) and ``top1_agreement``.
        reference_tokenizer: the reference's tokenizer; when given it must match ``tokenizer``.
        progress: called with progress in input tokens.
        model_name: how to name the model in the result (default: its ``name_or_path``).
        reference_name: how to name the reference.

    Returns:
        The result; ``per_domain`` is filled when the documents have domains.

    Raises:
        UsageError: a bad ``seq_len`` / ``batch_size`` / ``max_tokens``, or ``seq_len`` beyond a model's
            ``max_position_embeddings``.
        ModelLoadError: ``TOKENIZER_MISMATCH`` (tokenizers differ, or the two models' vocabularies do).
        DatasetError: ``DATASET_EMPTY`` when the documents give no token to score.
        MoetoolError: ``NON_FINITE`` when a model's logits are NaN or infinite.
    """
    import itertools

    from moetool.modeling import check_same_tokenizer

    runner = _as_runner(model)
    reference = _as_runner(reference_model) if reference_model is not None else None
    name = model_name or _model_name(runner.model)
    ref_name = (reference_name or _model_name(reference.model)) if reference is not None else None
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, not {batch_size}")
    check_seq_len(runner.config, seq_len, name)
    if reference is not None:
        check_seq_len(reference.config, seq_len, ref_name or "the reference")
        if reference_tokenizer is not None:
            check_same_tokenizer(tokenizer, reference_tokenizer, names=(name, ref_name or "the reference"))
        if _vocab_rows(reference.model) != _vocab_rows(runner.model):
            raise ModelLoadError(
                f"{name} has {_vocab_rows(runner.model)} token embeddings and {ref_name} "
                f"{_vocab_rows(reference.model)}: their vocabularies differ",
                hint="compare models that share a tokenizer and vocabulary",
                code="TOKENIZER_MISMATCH",
            )
    vocab = _vocab_rows(runner.model)
    pad_id = tokenizer.pad_token_id
    if not isinstance(pad_id, int) or not 0 <= pad_id < vocab:
        pad_id = 0  # any id will do: padding is masked out and never scored

    share = 0.5 if reference is not None else 1.0

    def advance(tokens: float) -> None:
        if progress is not None:
            progress(tokens * share)

    from moetool.runner.dist import current_ranks

    ranks = current_ranks(str(runner.device))
    windows = iter_windows(tokenizer, documents, seq_len=seq_len, max_tokens=max_tokens)
    # The runners refuse token ids beyond the vocabulary (TOKENIZER_MISMATCH) before anything runs. With
    # several processes, each scores a share of the batches and the sums are added up below.
    batches = ranks.shard(iter_batches(windows, batch_size=batch_size, pad_id=pad_id))
    sums: dict[str | None, _Sums] = {}
    input_tokens = 0
    if reference is None:
        pairs = (
            (index, batch, logits, None) for index, batch, logits in runner.logits_batches(batches, on_tokens=advance)
        )
    else:
        mine, theirs = itertools.tee(batches)
        pairs = (
            (index, batch, logits, ref_logits)
            for (index, batch, logits), (_, _, ref_logits) in zip(
                runner.logits_batches(mine, on_tokens=advance),
                reference.logits_batches(theirs, on_tokens=advance),
                strict=True,
            )
        )
    for _index, batch, logits, ref_logits in pairs:
        if ref_logits is not None and ref_logits.shape[-1] != logits.shape[-1]:
            raise ModelLoadError(
                f"{name} predicts over {logits.shape[-1]} tokens and {ref_name} over "
                f"{ref_logits.shape[-1]}: their vocabularies differ",
                hint="compare models that share a tokenizer and vocabulary",
                code="TOKENIZER_MISMATCH",
            )
        lengths = batch.attention_mask.sum(dim=1).tolist()
        for row, (length, domain) in enumerate(zip(lengths, batch.domains, strict=True)):
            input_tokens += length
            window = _score_window(
                logits[row, : length - 1],
                batch.input_ids[row, 1:length],
                None if ref_logits is None else ref_logits[row, : length - 1],
            )
            _check_finite(window, name, ref_name)
            sums.setdefault(domain, _Sums()).add(window)
        del logits, ref_logits

    if ranks.world > 1:
        merged: dict[str | None, _Sums] = {}
        for part in ranks.gather(sums):
            for domain, figures in part.items():
                merged.setdefault(domain, _Sums()).add(figures)
        sums = merged
        input_tokens = sum(ranks.gather(input_tokens))
    total = _Sums()
    for part in sums.values():
        total.add(part)
    if total.tokens == 0:
        raise DatasetError(
            "the dataset gives no token to score (every window holds fewer than 2 tokens)",
            hint="use a dataset with more text, or a larger --max-tokens",
            code="DATASET_EMPTY",
        )
    with_reference = reference is not None
    figures = _figures(total, with_reference)
    per_domain = {
        domain: _figures(part, with_reference) for domain, part in sums.items() if domain is not None and part.tokens
    }
    return EvalResult(
        model=name,
        tokens=total.tokens,
        windows=total.windows,
        nll=figures["nll"],
        perplexity=figures["perplexity"],
        reference=ref_name,
        kl=figures.get("kl"),
        top1_agreement=figures.get("top1_agreement"),
        reference_perplexity=figures.get("reference_perplexity"),
        per_domain=per_domain,
        input_tokens=input_tokens,
        seq_len=seq_len,
    )


def _check_finite(window: _Sums, name: str, ref_name: str | None) -> None:
    if not math.isfinite(window.nll):
        raise MoetoolError(
            f"{name} produced non-finite logits (NaN or infinity)",
            hint="float16 overflows in some models: try --dtype bfloat16 or float32",
            code="NON_FINITE",
        )
    if not math.isfinite(window.kl):
        raise MoetoolError(
            f"KL({ref_name} || {name}) is not finite: {name} gives zero probability to a token {ref_name} "
            "predicts, or the reference's logits are NaN",
            hint="float16 overflows in some models: try --dtype bfloat16 or float32",
            code="NON_FINITE",
        )


def _score_window(logits: Any, targets: Any, ref_logits: Any | None) -> _Sums:
    """Sums for one window: ``logits`` ``[n-1, V]`` predict ``targets`` ``[n-1]``."""
    import torch

    sums = _Sums(windows=1, tokens=int(targets.shape[0]))
    if sums.tokens == 0:
        return sums
    log_p = torch.log_softmax(logits.float(), dim=-1)
    targets = targets.to(log_p.device)
    nll = -log_p.gather(-1, targets[:, None]).squeeze(-1)
    sums.nll = float(nll.double().sum())
    if ref_logits is not None:
        log_q = torch.log_softmax(ref_logits.to(log_p.device).float(), dim=-1)
        # KL(ref || model) per position. Terms where p_ref is exactly 0 are 0 (the limit of q log q), also
        # when both models mask a token with -inf logits, where the plain product would be 0 * NaN.
        q = log_q.exp()
        kl = torch.where(q > 0, q * (log_q - log_p), torch.zeros_like(q)).sum(dim=-1)
        sums.kl = float(kl.double().sum())
        sums.agree = int((log_q.argmax(dim=-1) == log_p.argmax(dim=-1)).sum())
        sums.ref_nll = float(-log_q.gather(-1, targets[:, None]).squeeze(-1).double().sum())
    return sums
