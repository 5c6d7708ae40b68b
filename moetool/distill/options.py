"""The settings of a distillation run, their defaults and their checks (no torch here).

The defaults were chosen by measurement on the trained example MoE (``examples/tiny-moe``; see
``docs/distill-results.md`` and ``bench/distill.py``): the student starts from the teacher (attention,
norms and embeddings copied, each FFN the top experts' neurons concatenated, at the teacher's active FFN
width), learns mostly from the teacher's soft targets, and a default run finishes in minutes on two CPU
cores.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from moetool.errors import UsageError

#: Student initialisations taken from the teacher (through ``moetool merge --to-dense``), plus ``random``.
#: Anything else is read as the path of an existing dense checkpoint.
FROM_TEACHER = ("concat", "top1", "average")
INIT_STRATEGIES = (*FROM_TEACHER, "random")
SCHEDULES = ("cosine", "linear", "constant")

DEFAULT_INIT = "concat"
DEFAULT_STEPS = 300
DEFAULT_LR = 1e-3
DEFAULT_BATCH_SIZE = 8
DEFAULT_SEQ_LEN = 256
DEFAULT_TEMPERATURE = 1.0
DEFAULT_ALPHA = 0.9
DEFAULT_WARMUP_FRACTION = 0.05


@dataclass
class DistillOptions:
    """Everything that decides what a distillation run computes.

    Attributes:
        init: ``concat`` (the most used experts' neurons side by side, ``intermediate_size`` of them),
            ``top1`` (each layer's most used expert), ``average`` (the experts averaged after neuron
            alignment), ``random``, or the path of a dense checkpoint with the teacher's tokenizer.
        intermediate_size: the student's FFN width for ``concat`` and ``random`` (default: the teacher's
            active FFN width, top-k x expert width).
        steps: optimizer steps.
        lr: peak learning rate (AdamW).
        warmup_steps: linear warmup steps (default: 5% of ``steps``).
        schedule: decay after warmup: ``cosine``, ``linear`` or ``constant``.
        min_lr_ratio: the learning rate at the end of the decay, as a fraction of ``lr``.
        weight_decay: AdamW weight decay on matrices (not on norms, biases or embeddings).
        optimizer: ``adamw``, or ``adamw8bit`` (bitsandbytes' 8-bit AdamW, CUDA only).
        max_grad_norm: gradient clipping (0: off).
        batch_size: windows per micro-batch, per process.
        grad_accum: micro-batches per optimizer step.
        seq_len: tokens per training window.
        temperature: softmax temperature of the KD term (the KL is scaled by ``temperature**2``).
        alpha: weight of the KD term; ``1 - alpha`` weighs cross-entropy on the data. 0 is plain
            language-model training (no teacher forward pass at all).
        cache_topk: cache the teacher's top-k log-probabilities per token (plus the rest's total mass)
            before training and free the teacher; 0 runs the teacher beside the student (exact KL).
        dtype: ``auto`` (float32 on CPU, bfloat16 mixed precision on GPUs that have it, else float16),
            ``float32``, ``bfloat16`` or ``float16`` (mixed precision; master weights stay float32).
        seed: seeds the data order and the random initialisation.
        calibration_tokens: tokens of the training data run through the teacher to initialise the
            student from its experts (which experts and neurons are used most).
        eval_max_tokens: held-out tokens for the perplexities (None: all).
        eval_batch_size: windows per forward pass during evaluation.
        save_every: steps between checkpoints (a checkpoint is also written at step 0 and on Ctrl-C).
        log_every: steps between loss-curve entries.
        max_train_tokens: read at most this many tokens of training data (None: all).
        threads: CPU threads for torch (0: OMP_NUM_THREADS if set, else the idle cores; see moetool.threads).
        whole_model: load the teacher whole for its evaluations and the top-k cache instead of running it
            one decoder layer at a time (a teacher running beside the student, ``cache_topk`` 0, is always
            loaded whole).
    """

    init: str = DEFAULT_INIT
    intermediate_size: int | None = None
    steps: int = DEFAULT_STEPS
    lr: float = DEFAULT_LR
    warmup_steps: int | None = None
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    max_grad_norm: float = 1.0
    batch_size: int = DEFAULT_BATCH_SIZE
    grad_accum: int = 1
    seq_len: int = DEFAULT_SEQ_LEN
    temperature: float = DEFAULT_TEMPERATURE
    alpha: float = DEFAULT_ALPHA
    cache_topk: int = 0
    dtype: str = "auto"
    seed: int = 0
    calibration_tokens: int = 50_000
    eval_max_tokens: int | None = 100_000
    eval_batch_size: int = 8
    save_every: int = 100
    log_every: int = 10
    max_train_tokens: int | None = None
    threads: int = 0
    whole_model: bool = False

    @property
    def init_from_teacher(self) -> bool:
        """Whether the student is built from the teacher's experts."""
        return self.init in FROM_TEACHER

    @property
    def init_is_path(self) -> bool:
        """Whether ``init`` names a dense checkpoint rather than a strategy."""
        return self.init not in INIT_STRATEGIES

    @property
    def warmup(self) -> int:
        """The warmup steps in effect."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        return min(self.steps - 1, max(1, round(DEFAULT_WARMUP_FRACTION * self.steps))) if self.steps > 1 else 0

    def check(self) -> None:
        """Refuse values out of range or that do not fit together (before anything is loaded).

        Raises:
            UsageError: naming the option.
        """
        from moetool.modeling import check_dtype_name

        def bad(message: str, hint: str | None = None) -> UsageError:
            return UsageError(message, hint=hint, code="OPTION_INVALID")

        if not self.init:
            raise bad("--init is empty", hint=f"use one of {', '.join(INIT_STRATEGIES)} or a dense checkpoint path")
        if self.intermediate_size is not None:
            if self.intermediate_size < 1:
                raise bad(f"--intermediate-size must be at least 1, not {self.intermediate_size}")
            if self.init not in ("concat", "random"):
                what = "a checkpoint's width is its own" if self.init_is_path else f"{self.init} keeps the experts'"
                raise bad(f"--intermediate-size applies to --init concat or random ({what})")
        if self.steps < 1:
            raise bad(f"--steps must be at least 1, not {self.steps}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise bad(f"--lr must be a positive number, not {self.lr}")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps < max(self.steps, 1):
            raise bad(f"--warmup-steps must be 0 to {self.steps - 1} (below --steps), not {self.warmup_steps}")
        if self.schedule not in SCHEDULES:
            raise bad(f"unknown --schedule {self.schedule!r}", hint=f"use one of {', '.join(SCHEDULES)}")
        if not (math.isfinite(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1):
            raise bad(f"--min-lr-ratio must be between 0 and 1, not {self.min_lr_ratio}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise bad(f"--weight-decay must be 0 or more, not {self.weight_decay}")
        if self.optimizer not in ("adamw", "adamw8bit"):
            raise bad(f"unknown --optimizer {self.optimizer!r}", hint="use adamw or adamw8bit")
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm >= 0):
            raise bad(f"--max-grad-norm must be 0 (off) or more, not {self.max_grad_norm}")
        for name, value, low in (
            ("--batch-size", self.batch_size, 1),
            ("--grad-accum", self.grad_accum, 1),
            ("--seq-len", self.seq_len, 2),
            ("--eval-batch-size", self.eval_batch_size, 1),
            ("--save-every", self.save_every, 1),
            ("--log-every", self.log_every, 1),
            ("--cache-topk", self.cache_topk, 0),
            ("--calibration-tokens", self.calibration_tokens, 1),
            ("--threads", self.threads, 0),
        ):
            if value < low:
                raise bad(f"{name} must be at least {low}, not {value}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise bad(
                f"--temperature must be a positive number, not {self.temperature}",
                hint="1 is the teacher's own distribution; 2 softens it",
            )
        if not (math.isfinite(self.alpha) and 0 <= self.alpha <= 1):
            raise bad(
                f"--alpha must be between 0 and 1, not {self.alpha}",
                hint="the weight of the KD term: 1 is distillation only, 0 cross-entropy only",
            )
        if self.cache_topk and self.alpha == 0:
            raise bad("--cache-topk caches the teacher for the KD term, which --alpha 0 switches off")
        for name, value in (("--eval-max-tokens", self.eval_max_tokens), ("--max-train-tokens", self.max_train_tokens)):
            if value is not None and value < 1:
                raise bad(f"{name} must be at least 1 (or unset), not {value}")
        check_dtype_name(self.dtype)

    def fingerprint(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run that wrote the checkpoint.

        Evaluation, logging, checkpoint spacing and thread settings are left out: they do not change the
        trained weights' trajectory (threads change float rounding at most).
        """
        keep = asdict(self)
        for key in ("eval_max_tokens", "eval_batch_size", "save_every", "log_every", "threads"):
            keep.pop(key)
        keep["warmup_steps"] = self.warmup
        return keep
