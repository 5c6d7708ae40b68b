"""Calibration: the inputs each expert sees, layer by layer, and per-expert Hessians with coverage.

Layer by layer, as GPTQ implementations do: one pass of the model records, for every calibration
batch, the hidden states entering the first decoder layer and the arguments every decoder layer is
called with (rotary embeddings, masks). Each layer then runs on its own, on the stored hidden states:
its Hessians are collected, its weights quantized, and its *quantized* output becomes the next layer's
input, so later layers are calibrated on what the quantized model really feeds them. Memory holds the
calibration activations (tokens x hidden size) and one layer's Hessians; collecting all layers'
Hessians in one pass instead would need ``E x (H^2 + I^2)`` floats for every layer at once (6.6 GB per
Mixtral-8x7B layer) and would calibrate later layers on unquantized inputs.

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

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from moetool.errors import UsageError

if TYPE_CHECKING:
    import torch

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


class _StopForward(Exception):
    """Raised inside the capture pass once nothing more is needed."""


def _to(value: Any, device: torch.device, memo: dict[int, Any]) -> Any:
    """Move the tensors of a nested argument structure; ``memo`` keeps one copy of a tensor that several
    layers receive (the rotary embeddings, the mask)."""
    import torch

    if isinstance(value, torch.Tensor):
        hit = memo.get(id(value))
        if hit is None or hit[0] is not value:
            # The source is kept in the memo too, so its id cannot be reused while the memo lives.
            hit = memo[id(value)] = (value, value.detach().to(device))
        return hit[1]
    if isinstance(value, tuple):
        return tuple(_to(v, device, memo) for v in value)
    if isinstance(value, list):
        return [_to(v, device, memo) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device, memo) for k, v in value.items()}
    return value


class LayerInputs:
    """Calibration activations between decoder layers, and each layer's call arguments.

    Attributes:
        hidden: per batch, the hidden states entering the current layer ``[B, S, H]``.
        masks: per batch, which of the ``B * S`` flattened positions are real tokens.
        calls: per layer, per batch, the other positional and keyword arguments of its call.
        tokens: real calibration tokens.
    """

    def __init__(self) -> None:
        self.hidden: list[torch.Tensor] = []
        self.masks: list[torch.Tensor] = []
        self.calls: dict[int, list[tuple[tuple[Any, ...], dict[str, Any]]]] = {}
        self.tokens = 0
        #: The mask of the batch being run (read by the hooks).
        self.current_mask: torch.Tensor | None = None

    @classmethod
    def capture(cls, model: Any, layers: dict[int, Any], batches: Iterable[Any], device: torch.device) -> LayerInputs:
        """Run the model's embedding, rotary and mask code once per batch and record every layer's call.

        Decoder layers are bypassed during the capture (they return their input unchanged), so this
        costs an embedding lookup per batch; only the arguments each layer receives are kept.
        """
        import torch

        inputs = cls()
        first = min(layers)
        handles = []
        memo: dict[int, Any] = {}  # per batch

        def recorder(index: int) -> Callable[..., None]:
            def hook(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                hidden = args[0] if args else kwargs["hidden_states"]
                rest_kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                call = (_to(tuple(args[1:]), device, memo), _to(rest_kwargs, device, memo))
                inputs.calls.setdefault(index, []).append(call)
                if index == first:
                    inputs.hidden.append(hidden.detach().to(device))

            return hook

        def passthrough(*args: Any, **kwargs: Any) -> Any:
            return args[0] if args else kwargs["hidden_states"]

        backbone = model.base_model if getattr(model, "base_model", None) is not None else model
        try:
            for index, module in layers.items():
                handles.append(module.register_forward_pre_hook(recorder(index), with_kwargs=True))
                module.forward = passthrough
            with torch.no_grad():
                for batch in batches:
                    memo.clear()
                    mask = batch.attention_mask
                    embed_device = model.get_input_embeddings().weight.device
                    backbone(
                        input_ids=batch.input_ids.to(embed_device),
                        attention_mask=mask.to(embed_device),
                        use_cache=False,
                    )
                    inputs.masks.append(mask.reshape(-1).bool().to(device))
                    inputs.tokens += int(mask.sum())
        finally:
            for handle in handles:
                handle.remove()
            for module in layers.values():
                module.__dict__.pop("forward", None)
        return inputs

    def run(self, layer: int, module: Any, *, keep: bool) -> None:
        """Run one decoder layer over every batch; with ``keep`` its outputs become the next inputs."""
        import torch

        from moetool.quantize.gptq import reproducible_threads

        calls = self.calls.get(layer)
        if calls is None or len(calls) != len(self.hidden):
            raise RuntimeError(f"no recorded call arguments for decoder layer {layer}")
        # Every layer's output feeds the next layer's Hessians: a fixed thread count, also for the layers
        # that are only run through (see moetool.quantize.gptq).
        device = self.hidden[0].device if self.hidden else "cpu"
        with torch.no_grad(), reproducible_threads(device):
            for b, (args, kwargs) in enumerate(calls):
                self.current_mask = self.masks[b]
                out = module(self.hidden[b], *args, **kwargs)
                if isinstance(out, tuple):
                    out = out[0]
                if keep:
                    self.hidden[b] = out.detach()
        self.current_mask = None


# ----------------------------------------------------------------------------- Hessians


def _masked_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    x = x.reshape(-1, x.shape[-1])
    if mask is not None and mask.numel() == x.shape[0]:
        x = x[mask]
    return x


class LinearHessian:
    """``sum x x^T`` of the inputs of one ``nn.Linear`` (hook on its input)."""

    def __init__(self, module: Any, inputs: LayerInputs, device: torch.device) -> None:
        import torch

        columns = module.in_features
        self.hessian = torch.zeros((columns, columns), dtype=torch.float32, device=device)
        self.tokens = 0
        self._inputs = inputs
        self._handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, _module: Any, args: tuple[Any, ...]) -> None:
        x = _masked_rows(args[0].detach(), self._inputs.current_mask).float()
        self.hessian.addmm_(x.T, x)
        self.tokens += x.shape[0]

    def remove(self) -> None:
        self._handle.remove()


class ExpertsHessians:
    """Per-expert Hessians of one layer's routed experts, from the experts module's input.

    Use :meth:`collect_gate_up` for a forward pass collecting ``[E, H, H]`` (and the all-token
    ``[H, H]``), then :meth:`plan_coverage`, then :meth:`collect_down` for a pass collecting ``[E, I, I]``
    from ``act(gate) * up`` computed with the module's *current* (by then quantized) gate/up weights.

    Args:
        module: the transformers experts module (gate_up_proj ``[E, 2I, H]``, down_proj, act_fn).
        inputs: the layer inputs (for the padding mask of the running batch).
        options: coverage options.
        experts: the experts to collect for (a chunk, for memory); all when ``None``.
    """

    def __init__(
        self, module: Any, inputs: LayerInputs, options: CoverageOptions, experts: list[int] | None = None
    ) -> None:
        import torch

        self.module = module
        self.inputs = inputs
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

    def _call_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = args[0] if args else kwargs["hidden_states"]
        index = args[1] if len(args) > 1 else kwargs["top_k_index"]
        mask = self.inputs.current_mask
        x = hidden.detach().reshape(-1, hidden.shape[-1])
        idx = index.detach().reshape(x.shape[0], -1)
        if mask is not None and mask.numel() == x.shape[0]:
            x, idx = x[mask], idx[mask]
        return x.float(), idx

    def _take(self, rows: torch.Tensor, expert: int, used: torch.Tensor) -> torch.Tensor:
        cap = self.options.max_tokens_per_expert
        if cap:
            room = max(0, cap - int(used[expert]))
            rows = rows[:room]
        used[expert] += rows.shape[0]
        return rows

    # -- pass 1: gate/up

    def collect_gate_up(self, *, keep_inputs: bool = False) -> Any:
        """Start collecting gate/up Hessians; returns the hook handle (``.remove()`` it after the pass).

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

        def hook(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x, idx = self._call_inputs(args, kwargs)
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

        return self.module.register_forward_pre_hook(hook, with_kwargs=True)

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

    def collect_down(self) -> Any:
        """Start collecting down-projection Hessians; returns the hook handle."""
        self._start_down()

        def hook(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self._accumulate_down(*self._call_inputs(args, kwargs))

        return self.module.register_forward_pre_hook(hook, with_kwargs=True)

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
