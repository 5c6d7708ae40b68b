"""Calibration: the inputs each expert sees, layer by layer, and per-expert Hessians with coverage.

Layer by layer, as GPTQ implementations do, through the layer-streamed runner
(:mod:`moetool.runner`): each decoder layer is read from the checkpoint, runs over every calibration
batch (its Hessians are collected), its weights are quantized, and its *quantized* output becomes the
next layer's input, so later layers are calibrated on what the quantized model really feeds them.
Memory holds the calibration activations (tokens x hidden size), one layer's weights and its Hessians;
collecting all layers' Hessians in one pass instead would need ``E x (H^2 + I^2)`` floats for every
layer at once (6.6 GB per Mixtral-8x7B layer) and would calibrate later layers on unquantized inputs.

Per-expert Hessians come from a hook on the experts module's input: ``(hidden_states, top_k_index,
top_k_weights)`` is exactly what the model's own router chose (the routing rule of each family is
applied by the model before that call), whatever experts implementation runs after it. Coverage:

* by default an expert's Hessian sums the tokens routed to it;
* ``all_experts`` gives every expert every calibration token (QMoE / llm-compressor's "calibrate all
  experts"; the model's output still uses the real routing);
* ``max_tokens_per_expert`` stops adding tokens to an expert once it has that many (hot experts);
* experts with fewer than ``min_tokens_per_expert`` routed tokens fall back to the layer's all-token
  Hessian (``fallback="all-tokens"``) or to round-to-nearest (``fallback="rtn"``).

Padding positions never enter a Hessian.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from moetool.errors import UsageError

if TYPE_CHECKING:
    import torch

    from moetool.runner.observe import InputEvent

FALLBACKS = ("all-tokens", "rtn")


@dataclass(frozen=True)
class CoverageOptions:
    """How calibration tokens reach experts (see the module docstring)."""

    all_experts: bool = False
    max_tokens_per_expert: int = 0
    min_tokens_per_expert: int = 64
    fallback: str = "all-tokens"

    def validate(self) -> None:
        """Raises: UsageError for negative counts or an unknown fallback."""
        if self.max_tokens_per_expert < 0:
            raise UsageError("--max-tokens-per-expert must be 0 (no cap) or positive")
        if self.min_tokens_per_expert < 0:
            raise UsageError("--min-tokens-per-expert must not be negative")
        if self.fallback not in FALLBACKS:
            raise UsageError(f"unknown --fallback {self.fallback!r}", hint="use all-tokens or rtn")
        if self.max_tokens_per_expert and self.max_tokens_per_expert < self.min_tokens_per_expert:
            raise UsageError(
                "--max-tokens-per-expert is below --min-tokens-per-expert",
                hint="the cap must leave at least the minimum",
            )


@dataclass
class ExpertCoverage:
    """Calibration of one expert.

    Attributes:
        expert: index.
        routed: calibration tokens the router sent to it.
        used: tokens in its gate/up Hessian (after the cap; all tokens with ``all_experts`` or the
            all-tokens fallback).
        hessian: ``routed``, ``all_tokens`` (all_experts mode or fallback) or ``rtn`` (fallback).
    """

    expert: int
    routed: int
    used: int
    hessian: str

    def to_json(self) -> dict[str, Any]:
        return {"expert": self.expert, "routed": self.routed, "used": self.used, "hessian": self.hessian}


@dataclass
class LayerCoverage:
    """Calibration of one MoE layer's experts."""

    layer: int
    tokens: int
    experts: list[ExpertCoverage] = field(default_factory=list)

    @property
    def fallbacks(self) -> int:
        """Experts below the minimum (in routed mode)."""
        return sum(
            1 for e in self.experts if e.hessian in ("rtn",) or (e.hessian == "all_tokens" and e.used != e.routed)
        )

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "tokens": self.tokens, "experts": [e.to_json() for e in self.experts]}


# ----------------------------------------------------------------------------- layer inputs


class CalibrationRunner(Protocol):
    """Runs one decoder layer over the calibration batches (the layer-streamed runner provides it).

    Attributes:
        current_mask: while a batch runs, which of its flattened positions are real tokens.
        tokens: real calibration tokens.
    """

    current_mask: Any
    tokens: int

    def run(self, layer: int, module: Any, *, keep: bool) -> None:
        """Run ``module`` (decoder layer ``layer``) over every batch; with ``keep`` its outputs feed the
        next layer."""

    def reduce(self, tensor: Any) -> Any:
        """Sum a statistic over the processes that share the calibration batches (in place)."""


# ----------------------------------------------------------------------------- Hessians


class LinearHessian:
    """``sum x x^T`` of the inputs of one ``nn.Linear``, fed by the observer (:meth:`add`, an
    :meth:`moetool.runner.observe.Observer.on_input` callback)."""

    def __init__(self, module: Any, device: torch.device) -> None:
        import torch

        columns = module.in_features
        self.hessian = torch.zeros((columns, columns), dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, event: InputEvent) -> None:
        """Add one call's real (not padding) input rows."""
        x = event.masked(event.args[0]).float()
        self.hessian.addmm_(x.T, x)
        self.tokens += x.shape[0]

    def reduce(self, runner: CalibrationRunner) -> None:
        """Sum the Hessian and token count over the processes."""
        import torch

        runner.reduce(self.hessian)
        self.tokens = int(runner.reduce(torch.tensor([self.tokens], dtype=torch.long))[0])


class ExpertsHessians:
    """Per-expert Hessians of one layer's routed experts, from the experts module's input.

    Use :meth:`collect_gate_up` (its callback subscribed to the experts module's input through
    :class:`moetool.runner.observe.Observer`, which gives each call's padding mask) for a forward pass
    collecting ``[E, H, H]`` (and the all-token ``[H, H]``) and keeping the experts' inputs, then
    :meth:`plan_coverage`, then :meth:`down_from_cache` collecting ``[E, I, I]`` from ``act(gate) * up``
    computed with the module's *current* (by then quantized) gate/up weights.

    Args:
        module: the transformers experts module (gate_up_proj ``[E, 2I, H]``, down_proj, act_fn).
        options: coverage options.
        experts: the experts to collect for (a chunk, for memory); all when ``None``.
    """

    def __init__(self, module: Any, options: CoverageOptions, experts: list[int] | None = None) -> None:
        import torch

        self.module = module
        self.options = options
        e, two_i, h = module.gate_up_proj.shape
        self.num_experts = int(e)
        self.hidden = int(h)
        self.intermediate = int(two_i) // 2
        self.experts = list(range(self.num_experts)) if experts is None else list(experts)
        self.device = module.gate_up_proj.device
        self.routed = torch.zeros(self.num_experts, dtype=torch.long)
        self.used = torch.zeros(self.num_experts, dtype=torch.long)
        self.all_tokens = 0
        self.all_hessian: torch.Tensor | None = None
        self.gate_up: torch.Tensor | None = None
        self.down: torch.Tensor | None = None
        self.source: dict[int, str] = {}
        self._down_used = torch.zeros(self.num_experts, dtype=torch.long)
        #: The experts' inputs seen in the gate/up pass, kept when :meth:`collect_gate_up` is asked to,
        #: so that the down pass can run on them without running the whole layer again.
        self.cached: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    # -- helpers

    @staticmethod
    def _call_inputs(event: InputEvent) -> tuple[torch.Tensor, torch.Tensor]:
        """The experts' real (not padding) input rows ``[n, H]`` and their top-k indices ``[n, k]``."""
        hidden = event.argument(0, "hidden_states")
        x = hidden.reshape(-1, hidden.shape[-1])
        idx = event.argument(1, "top_k_index").reshape(x.shape[0], -1)
        return event.masked(x).float(), event.masked(idx)

    def _take(self, rows: torch.Tensor, expert: int, used: torch.Tensor) -> torch.Tensor:
        cap = self.options.max_tokens_per_expert
        if cap:
            room = max(0, cap - int(used[expert]))
            rows = rows[:room]
        used[expert] += rows.shape[0]
        return rows

    # -- pass 1: gate/up

    def collect_gate_up(self, *, keep_inputs: bool = False) -> Callable[[InputEvent], None]:
        """Start collecting gate/up Hessians; returns the callback to subscribe to the experts module's
        input (:meth:`moetool.runner.observe.Observer.on_input`) for the pass.

        Args:
            keep_inputs: also keep the experts' inputs for :meth:`down_from_cache` (valid only while
                nothing before the experts in the layer changes, i.e. when only experts are quantized).
        """
        import torch

        h, n = self.hidden, len(self.experts)
        self.all_hessian = torch.zeros((h, h), dtype=torch.float32, device=self.device)
        if not self.options.all_experts:
            self.gate_up = torch.zeros((n, h, h), dtype=torch.float32, device=self.device)
        self.cached = [] if keep_inputs else None

        def on_input(event: InputEvent) -> None:
            x, idx = self._call_inputs(event)
            if self.cached is not None:
                self.cached.append((x, idx))
            assert self.all_hessian is not None
            self.all_hessian.addmm_(x.T, x)
            self.all_tokens += x.shape[0]
            for slot, expert in enumerate(self.experts):
                rows = x[(idx == expert).any(-1)]
                self.routed[expert] += rows.shape[0]
                if self.gate_up is not None:
                    rows = self._take(rows, expert, self.used)
                    if rows.shape[0]:
                        self.gate_up[slot].addmm_(rows.T, rows)

        return on_input

    def gate_up_from_cache(self, cached: list[tuple[torch.Tensor, torch.Tensor]], recorder: ExpertsHessians) -> None:
        """This chunk's gate/up Hessians from the experts' inputs a recorder kept (same sums, same order,
        as collecting them during the pass); the all-token Hessian is the recorder's."""
        import torch

        h, n = self.hidden, len(self.experts)
        self.all_hessian = recorder.all_hessian
        self.all_tokens = recorder.all_tokens
        if not self.options.all_experts:
            self.gate_up = torch.zeros((n, h, h), dtype=torch.float32, device=self.device)
        for x, idx in cached:
            for slot, expert in enumerate(self.experts):
                rows = x[(idx == expert).any(-1)]
                self.routed[expert] += rows.shape[0]
                if self.gate_up is not None:
                    rows = self._take(rows, expert, self.used)
                    if rows.shape[0]:
                        self.gate_up[slot].addmm_(rows.T, rows)

    def reduce_all_tokens(self, runner: CalibrationRunner) -> None:
        """Sum the all-token Hessian and count over the processes (each saw a share of the batches)."""
        import torch

        assert self.all_hessian is not None
        runner.reduce(self.all_hessian)
        count = torch.tensor([self.all_tokens], dtype=torch.long)
        self.all_tokens = int(runner.reduce(count)[0])

    def reduce_gate_up(self, runner: CalibrationRunner) -> None:
        """Sum this chunk's gate/up statistics over the processes."""
        runner.reduce(self.routed)
        runner.reduce(self.used)
        if self.gate_up is not None:
            runner.reduce(self.gate_up)

    def reduce_down(self, runner: CalibrationRunner) -> None:
        """Sum the down pass's Hessians over the processes."""
        assert self.down is not None
        runner.reduce(self.down)
        runner.reduce(self._down_used)

    def plan_coverage(self) -> None:
        """Decide each expert's Hessian source (routed, all tokens, or round-to-nearest)."""
        import torch

        assert self.all_hessian is not None
        h, n = self.hidden, len(self.experts)
        if self.options.all_experts:
            self.gate_up = self.all_hessian.expand(n, h, h).clone()
            for expert in self.experts:
                self.source[expert] = "all_tokens"
                self.used[expert] = self.all_tokens
            return
        assert self.gate_up is not None
        eye = torch.eye(h, dtype=torch.float32, device=self.device)
        for slot, expert in enumerate(self.experts):
            if int(self.routed[expert]) >= self.options.min_tokens_per_expert and int(self.routed[expert]) > 0:
                self.source[expert] = "routed"
            elif self.options.fallback == "all-tokens" and self.all_tokens > 0:
                self.source[expert] = "all_tokens"
                self.gate_up[slot] = self.all_hessian
                self.used[expert] = self.all_tokens
            else:
                self.source[expert] = "rtn"
                self.gate_up[slot] = eye  # GPTQ with an identity Hessian is round-to-nearest
                self.used[expert] = 0

    # -- pass 2: down

    def _start_down(self) -> None:
        import torch

        i, n = self.intermediate, len(self.experts)
        self.down = torch.zeros((n, i, i), dtype=torch.float32, device=self.device)
        self._down_used.zero_()

    def down_from_cache(self) -> None:
        """Collect the down-projection Hessians from the inputs kept by the gate/up pass."""
        if self.cached is None:
            raise RuntimeError("down_from_cache needs collect_gate_up(keep_inputs=True)")
        self._start_down()
        for x, idx in self.cached:
            self._accumulate_down(x, idx)
        self.cached = None

    def _accumulate_down(self, x: torch.Tensor, idx: torch.Tensor) -> None:
        import torch

        assert self.down is not None
        for slot, expert in enumerate(self.experts):
            source = self.source.get(expert, "routed")
            if source == "rtn":
                continue
            rows = x if source == "all_tokens" else x[(idx == expert).any(-1)]
            if source == "routed":
                rows = self._take(rows, expert, self._down_used)
            if not rows.shape[0]:
                continue
            gate_up = self.module.gate_up_proj[expert].float()
            gate, up = torch.nn.functional.linear(rows, gate_up).chunk(2, dim=-1)
            act = self.module.act_fn(gate) * up
            self.down[slot].addmm_(act.T, act)

    def finish_down(self) -> None:
        """Identity Hessians for the round-to-nearest fallbacks."""
        import torch

        assert self.down is not None
        eye = torch.eye(self.intermediate, dtype=torch.float32, device=self.device)
        for slot, expert in enumerate(self.experts):
            if self.source.get(expert) == "rtn":
                self.down[slot] = eye

    def coverage(self) -> list[ExpertCoverage]:
        return [
            ExpertCoverage(e, int(self.routed[e]), int(self.used[e]), self.source.get(e, "routed"))
            for e in self.experts
        ]
