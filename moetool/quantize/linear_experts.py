"""GPTQ of routed experts that are ``nn.Linear`` modules: two-matrix MLPs stored per expert (Switch
Transformers' ``wi``/``wo``, NLLB-MoE's ``fc1``/``fc2``), as the family's experts module calls them.

Each expert's Hessians come from the inputs of its own linear maps (watched through the one observation
path, :class:`moetool.runner.observe.Observer`), which see exactly the tokens the
model dispatched to it (after the router's choice and its capacity drop), whatever the dispatch code.
True-sequential inside the layer: the up projections are quantized first, then the layer runs again so
that the down projections' Hessians come from the *quantized* up outputs.

Padding never enters a Hessian: a pre-hook on the experts module keeps the padding rows of the call (the
running batch's mask over its flattened input); an expert's up projection receives copies of some of
those input rows, so its rows equal to a padding row are padding, and its down projection receives the
same rows in the same order (one MLP call), so the same flags apply. Coverage follows
:class:`moetool.quantize.calibrate.CoverageOptions`: routed tokens by default (capped by
``max_tokens_per_expert``), every token with ``all_experts``, and for experts below
``min_tokens_per_expert`` the all-token Hessians (the expert module run on every real token that reached
the experts module) or round-to-nearest.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from moetool.quantize.calibrate import CalibrationRunner, ExpertCoverage, LayerCoverage
from moetool.runner.observe import InputEvent, Observer

if TYPE_CHECKING:
    import torch

    from moetool.quantize.engine import LayerJob

#: Booleans compared at once when matching rows against the padding rows (bounds the transient memory).
_MATCH_CHUNK = 1 << 24


def padding_flags(rows: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
    """Which of ``rows`` (``[n, H]``) equal one of the ``padding`` rows (``[p, H]``)."""
    import torch

    flags = torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device)
    if padding is None or not padding.shape[0] or not rows.shape[0]:
        return flags
    padding = padding.to(device=rows.device, dtype=rows.dtype)
    step = max(1, _MATCH_CHUNK // max(1, padding.shape[0] * rows.shape[1]))
    for start in range(0, rows.shape[0], step):
        chunk = rows[start : start + step]
        flags[start : start + step] = (chunk[:, None, :] == padding[None]).all(-1).any(-1)
    return flags


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


@dataclass
class _Expert:
    """One expert's linear maps and statistics."""

    index: int
    up: str
    down: str
    module: str
    routed: int = 0
    used: int = 0
    down_used: int = 0
    source: str = "routed"
    flags: Any = None  # padding flags of the rows of the running MLP call


@dataclass
class LinearExpertsHessians:
    """Hooks collecting per-expert Hessians of one layer's linear experts (see the module docstring)."""

    job: LayerJob
    inputs: CalibrationRunner
    experts: dict[int, _Expert] = field(default_factory=dict)
    up: dict[int, Any] = field(default_factory=dict)
    down: dict[int, Any] = field(default_factory=dict)
    all_hessian: Any = None
    all_tokens: int = 0
    cached: list[Any] = field(default_factory=list)
    _padding: Any = None
    _watch: list[tuple[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        by_expert: dict[int, dict[str, str]] = {}
        for name, (expert, role) in self.job.routed.items():
            by_expert.setdefault(expert, {})[role] = name
        for expert, names in sorted(by_expert.items()):
            self.experts[expert] = _Expert(expert, names["up"], names["down"], _parent(names["up"]))

    # -- hooks

    def _module(self, name: str) -> Any:
        return self.job.module.get_submodule(name)

    def _on_experts(self, record: bool) -> Any:
        def hook(event: InputEvent) -> None:
            hidden = event.argument(0, "hidden_states")
            x = hidden.detach().reshape(-1, hidden.shape[-1])
            mask = event.mask
            real = x
            self._padding = None
            if mask is not None and mask.numel() == x.shape[0]:
                real = x[mask]
                self._padding = x[~mask] if bool((~mask).any()) else None
            if record:
                real = real.float()
                self.all_hessian.addmm_(real.T, real)
                self.all_tokens += real.shape[0]
                self.cached.append(real)

        return hook

    def _rows(self, expert: _Expert, event: InputEvent, cap_used: str) -> Any:
        x = event.args[0].detach()
        x = x.reshape(-1, x.shape[-1])
        if expert.flags is not None and expert.flags.shape[0] == x.shape[0]:
            x = x[~expert.flags]
        cap = self.job.request.coverage.max_tokens_per_expert
        if cap:
            x = x[: max(0, cap - getattr(expert, cap_used))]
        setattr(expert, cap_used, getattr(expert, cap_used) + x.shape[0])
        return x.float()

    def _on_up(self, expert: _Expert, collect: bool) -> Any:
        def hook(event: InputEvent) -> None:
            x = event.args[0].detach()
            x = x.reshape(-1, x.shape[-1])
            expert.flags = padding_flags(x, self._padding)
            if collect:
                expert.routed += int(x.shape[0] - int(expert.flags.sum()))
                if expert.index in self.up:
                    rows = self._rows(expert, event, "used")
                    self.up[expert.index].addmm_(rows.T, rows)

        return hook

    def _on_down(self, expert: _Expert) -> Any:
        def hook(event: InputEvent) -> None:
            if expert.source == "routed":
                rows = self._rows(expert, event, "down_used")
                self.down[expert.index].addmm_(rows.T, rows)

        return hook

    def _hook(self, name: str, callback: Any) -> None:
        """Watch module ``name``'s inputs during the next :meth:`_run_layer`."""
        self._watch.append((name, callback))

    def _run_layer(self) -> None:
        """Run the layer once with the watched modules' inputs going to their callbacks."""
        observer = Observer(mask=lambda: self.inputs.current_mask)
        for name, callback in self._watch:
            observer.on_input({name: self._module(name)}, callback)
        self._watch = []
        with observer.watching():
            self.inputs.run(self.job.layer, self.job.module, keep=False)

    def _hook_experts_module(self, record: bool) -> None:
        for name in sorted({_parent(e.module) for e in self.experts.values()}):
            self._hook(name, self._on_experts(record))

    # -- passes

    def collect_up(self) -> None:
        """Run the layer once: the up projections' Hessians, routed counts and every real token's input."""
        import torch

        first = self._module(next(iter(self.experts.values())).up).weight
        device, h = first.device, int(first.shape[1])
        self.all_hessian = torch.zeros((h, h), dtype=torch.float32, device=device)
        if not self.job.request.coverage.all_experts:
            self.up = {e: torch.zeros((h, h), dtype=torch.float32, device=device) for e in self.experts}
        self._hook_experts_module(record=True)
        for expert in self.experts.values():
            self._hook(expert.up, self._on_up(expert, True))
        self._run_layer()
        self.inputs.reduce(self.all_hessian)
        counts = torch.tensor(
            [self.all_tokens] + [v for e in self.experts.values() for v in (e.routed, e.used)], dtype=torch.long
        )
        counts = self.inputs.reduce(counts).tolist()
        self.all_tokens = int(counts[0])
        for slot, expert in enumerate(self.experts.values()):
            expert.routed, expert.used = int(counts[1 + 2 * slot]), int(counts[2 + 2 * slot])
        for hessian in self.up.values():
            self.inputs.reduce(hessian)
        self._plan_up()

    def _plan_up(self) -> None:
        import torch

        coverage = self.job.request.coverage
        h = int(self.all_hessian.shape[0])
        for expert in self.experts.values():
            if coverage.all_experts:
                expert.source = "all_tokens"
            elif expert.routed >= coverage.min_tokens_per_expert and expert.routed > 0:
                expert.source = "routed"
            elif coverage.fallback == "all-tokens" and self.all_tokens > 0:
                expert.source = "all_tokens"
            else:
                expert.source = "rtn"
            if expert.source == "all_tokens":
                self.up[expert.index] = self.all_hessian.clone()
                expert.used = self.all_tokens
            elif expert.source == "rtn":
                # GPTQ with an identity Hessian is round-to-nearest.
                self.up[expert.index] = torch.eye(h, dtype=torch.float32, device=self.all_hessian.device)
                expert.used = 0

    def collect_down(self) -> None:
        """The down projections' Hessians from the (now quantized) up projections' outputs: routed
        experts by running the layer again, all-token ones by running the expert on every cached token."""
        import torch

        for expert in self.experts.values():
            weight = self._module(expert.down).weight
            i = int(weight.shape[1])
            self.down[expert.index] = torch.zeros((i, i), dtype=torch.float32, device=weight.device)
            expert.down_used = 0
        if any(e.source == "routed" for e in self.experts.values()):
            self._hook_experts_module(record=False)
            for expert in self.experts.values():
                self._hook(expert.up, self._on_up(expert, False))
                self._hook(expert.down, self._on_down(expert))
            self._run_layer()
        for expert in self.experts.values():
            if expert.source == "all_tokens":
                self._down_from_cache(expert)
        for expert in self.experts.values():
            self.inputs.reduce(self.down[expert.index])
            if expert.source == "rtn":
                eye = torch.eye(self.down[expert.index].shape[0], dtype=torch.float32)
                self.down[expert.index] = eye.to(self.down[expert.index].device)
        self.cached = []

    def _down_from_cache(self, expert: _Expert) -> None:
        hessian = self.down[expert.index]

        def hook(event: InputEvent) -> None:
            rows = event.args[0].detach().reshape(-1, event.args[0].shape[-1]).float()
            hessian.addmm_(rows.T, rows)

        module = self._module(expert.module)
        dtype = self._module(expert.up).weight.dtype
        # The cached rows are real tokens already: no mask.
        with Observer(mask=lambda: None).on_input({expert.down: self._module(expert.down)}, hook).watching():
            for rows in self.cached:
                module(rows.to(dtype))

    def coverage(self) -> LayerCoverage:
        return LayerCoverage(
            self.job.layer,
            self.all_tokens,
            [ExpertCoverage(e.index, e.routed, e.used, e.source) for e in self.experts.values()],
        )


def gptq_linear_experts(job: LayerJob, inputs: CalibrationRunner) -> None:
    """GPTQ of a layer's linear experts (``job.routed``): up projections, then down projections, each
    role's experts quantized together in chunks of ``job.expert_batch`` (identical shapes)."""
    import torch

    from moetool.quantize.engine import _chunks, _gptq, _write

    hessians = LinearExpertsHessians(job, inputs)
    hessians.collect_up()
    experts = list(hessians.experts.values())
    for role in ("up", "down"):
        if role == "down":
            hessians.collect_down()
        store = hessians.up if role == "up" else hessians.down
        for chunk in _chunks(len(experts), job.expert_batch):
            names = [getattr(experts[slot], role) for slot in chunk]
            modules = [job.module.get_submodule(name) for name in names]
            weight = torch.stack([m.weight for m in modules])
            hessian = torch.stack([store[experts[slot].index] for slot in chunk])
            quantized = _gptq(job, weight, hessian, role)
            for position, (name, module) in enumerate(zip(names, modules, strict=True)):
                _write(module.weight, quantized.dequantized[position])
                # The module holds the dequantized weights; the codes are all the writer needs.
                job.result.linears[name] = dataclasses.replace(quantized.select(position), dequantized=None)
            del weight, hessian, quantized
        store.clear()
    job.result.report.coverage = hessians.coverage()
