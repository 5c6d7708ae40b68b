"""The one observation path: hooks on a model's routers, experts or MLP modules while the runner runs it.

Every pass that watches a model from inside (profile-routing's counters, merge's calibration, the
quantize Hessians, upcycle's k-means router init) goes through :class:`Observer`. It owns what each of
them used to do for itself:

* finding the modules (:func:`moetool.routing.observe.find_routers` / ``find_modules``, from the
  registry) and registering the hooks, removed on the way out whatever happens;
* the padding mask of the batch that is running (from the batch, or from the caller's runner);
* decoding the router's output per the family's protocol (:mod:`moetool.routing.observe`), including
  the capacity-limited families' kept assignments;
* running the batches through the runner (:class:`moetool.runner.StreamedModel`, one decoder layer at
  a time, or :class:`moetool.runner.WholeModel`), and counting their real tokens.

Consumers subscribe callbacks: :meth:`Observer.on_route` receives a :class:`RouteEvent` per MoE layer
and batch; :meth:`Observer.on_input` receives an :class:`InputEvent` with the arguments a module is
called with. Events carry tensors as the model made them (padding rows included) and the mask, so a
device-side consumer can mask without a host sync and a host-side one takes :meth:`RouteEvent.masked`
rows. Nothing is kept between events: what a consumer holds per layer is its own.

The observer lives in the runner package because it is how a run is watched; what a router's output
means is family knowledge and stays in :mod:`moetool.routing.observe`, which it calls.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from moetool.errors import UnsupportedArchitectureError


def as_runner(model: Any) -> Any:
    """``model`` as a runner: a :class:`moetool.runner.StreamedModel` or :class:`moetool.runner.WholeModel`
    as it is, a loaded transformers model wrapped in a ``WholeModel``."""
    from moetool.runner.stream import StreamedModel, WholeModel

    return model if isinstance(model, (StreamedModel, WholeModel)) else WholeModel(model)


def _masked(tensor: Any, mask: Any) -> Any:
    """``tensor`` as rows ``[tokens, last dim]``, padding rows removed when ``mask`` fits them."""
    rows = tensor.reshape(-1, tensor.shape[-1])
    if mask is not None and mask.numel() == rows.shape[0]:
        rows = rows[mask.to(rows.device)]
    return rows


@dataclass
class RouteEvent:
    """One router call at one MoE layer, for the batch that is running.

    Attributes:
        layer: the MoE layer (numbered across the stacks of an encoder-decoder family).
        logits: router logits ``[tokens, experts]``.
        indices: the chosen experts ``[tokens, top_k]``.
        mask: bool ``[tokens]``, the real (not padding) tokens; ``None`` when the runner gives none.
        kept: bool ``[tokens, top_k]``, the assignments a capacity-limited model processed (the others
            were dropped); ``None`` for the other families.
        weights: the routing weights ``[tokens, top_k]`` as the MoE block applies them (subscriptions
            with ``weights=True``).
        x: the routed input ``[tokens, H]`` the router received (subscriptions with ``inputs=True``).
    """

    layer: int
    logits: Any
    indices: Any
    mask: Any = None
    kept: Any = None
    weights: Any = None
    x: Any = None

    def masked(self, tensor: Any) -> Any:
        """``tensor`` (one of this event's, or any ``[tokens, ...]``) without its padding rows."""
        return _masked(tensor, self.mask)


@dataclass
class InputEvent:
    """A watched module's call: its key (as subscribed), its arguments and the running batch's mask."""

    key: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    mask: Any = None

    def argument(self, position: int, name: str) -> Any:
        """The call's argument at ``position`` or, when passed by keyword, named ``name``."""
        return self.args[position] if len(self.args) > position else self.kwargs[name]

    def masked(self, tensor: Any) -> Any:
        """``tensor`` as rows ``[tokens, last dim]`` without the padding rows (detached)."""
        return _masked(tensor.detach(), self.mask)


@dataclass
class _RouteSubscription:
    callback: Callable[[RouteEvent], None]
    weights: bool
    inputs: bool


class Observer:
    """Hooks on a model, the running batch's padding mask, and the run itself.

    Args:
        runner: a :class:`moetool.runner.StreamedModel` or :class:`moetool.runner.WholeModel` (a bare
            transformers model is wrapped in a ``WholeModel``); ``None`` when the caller runs the model
            itself (the quantize engine, inside its own layer schedule) and gives ``mask``.
        spec: the family's registry entry (needed by :meth:`on_route` and :meth:`mlp_modules`).
        mask: where the running batch's flat real-token mask comes from when the caller runs the model
            (called at each hook); by default the observer's own, set by :meth:`run` before each batch.
    """

    def __init__(self, runner: Any = None, spec: Any = None, *, mask: Callable[[], Any] | None = None) -> None:
        self.runner = as_runner(runner) if runner is not None else None
        self.spec = spec
        #: Real tokens of the batches :meth:`run` ran (each batch counted once, whatever the layers).
        self.tokens = 0
        self._mask_source = mask
        self._mask: Any = None
        self._routes: list[_RouteSubscription] = []
        self._inputs: list[tuple[Mapping[Any, Any], Callable[[InputEvent], None]]] = []
        self._routers: dict[int, Any] | None = None
        self._handles: list[Any] = []

    @property
    def model(self) -> Any:
        """The transformers model the runner runs."""
        return self.runner.model

    @property
    def mask(self) -> Any:
        """The running batch's flat real-token mask (``None`` between batches)."""
        return self._mask_source() if self._mask_source is not None else self._mask

    # ------------------------------------------------------------------ what to watch

    @property
    def routers(self) -> dict[int, Any]:
        """The model's router modules by MoE layer, from the registry.

        Raises:
            UnsupportedArchitectureError: no router where the registry says.
        """
        if self._routers is None:
            from moetool.routing.observe import find_routers

            self._routers = find_routers(self.model, self.spec)
        return self._routers

    @property
    def layers(self) -> list[int]:
        """Indices of the MoE layers, ascending."""
        return sorted(self.routers)

    def on_route(
        self, callback: Callable[[RouteEvent], None], *, weights: bool = False, inputs: bool = False
    ) -> Observer:
        """Call ``callback`` with a :class:`RouteEvent` for every router call, in forward order.

        Args:
            weights: decode the routing weights too (the family's rule applied in float32, as the MoE
                block weighs the experts: :func:`moetool.routing.observe.routing_decision`); without it
                the choice is read as the profiler reads it (:func:`~moetool.routing.observe.decode_router_output`).
            inputs: give the router's input (the hidden states the MoE block routes) as ``x``.
        """
        self._routes.append(_RouteSubscription(callback, weights, inputs))
        return self

    def on_input(self, modules: Mapping[Any, Any], callback: Callable[[InputEvent], None]) -> Observer:
        """Call ``callback`` with an :class:`InputEvent` before each call of each of ``modules``
        (``{key: module}``; the event carries the key)."""
        self._inputs.append((modules, callback))
        return self

    def mlp_modules(self, layers: Iterable[int]) -> dict[int, Any]:
        """The dense MLP module of each of ``layers`` (the registry's ``dense_mlp`` tensors' module).

        Raises:
            ValueError: a layer has no such module (the registry and the model disagree).
        """
        # "mlp.gate_proj.weight" -> "mlp"
        mlp = self.spec.dense_mlp[0].name.rsplit(".", 2)[0]
        modules = dict(self.model.named_modules())
        found = {}
        for layer in layers:
            name = self.spec.layer_prefix.format(L=layer) + mlp
            if name not in modules:
                raise ValueError(f"the dense model has no module {name!r}")
            found[layer] = modules[name]
        return found

    # ------------------------------------------------------------------ running

    @contextmanager
    def watching(self) -> Iterator[Observer]:
        """Hooks registered for the subscriptions while the block runs; removed on the way out."""
        try:
            if self._routes:
                self._hook_routers()
            for modules, callback in self._inputs:
                for key, module in modules.items():
                    self._handles.append(
                        module.register_forward_pre_hook(self._input_hook(key, callback), with_kwargs=True)
                    )
            yield self
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles.clear()
            self._mask = None

    def run(
        self,
        batches: Iterable[Any],
        *,
        before_batch: Callable[[int, Any], None] | None = None,
        on_tokens: Callable[[float], None] | None = None,
        after_segment: Callable[[], None] | None = None,
    ) -> None:
        """Run ``batches`` (:class:`moetool.data.Batch`) through the runner with the hooks on.

        ``before_batch(index, batch)`` runs before each batch enters each layer, after the observer has
        set that batch's mask (:attr:`mask`, the same tensor at every layer of a segment); ``on_tokens``
        and ``after_segment`` are the runner's.
        """
        # One device mask per batch of the running segment, made when the batch enters the first layer
        # and reused by the others (a host-to-device copy per layer could wait for the device).
        masks: dict[int, Any] = {}
        device = self.runner.device

        def before(index: int, batch: Any) -> None:
            mask = masks.get(index)
            if mask is None:
                mask = masks[index] = batch.attention_mask.reshape(-1).bool().to(device)
                self.tokens += int(batch.attention_mask.sum())  # on the host: no device sync
            self._mask = mask
            if before_batch is not None:
                before_batch(index, batch)

        def after() -> None:
            masks.clear()
            if after_segment is not None:
                after_segment()

        with self.watching():
            self.runner.forward_batches(batches, before_batch=before, on_tokens=on_tokens, after_segment=after)

    # ------------------------------------------------------------------ hooks

    def _input_hook(self, key: Any, callback: Callable[[InputEvent], None]) -> Callable[..., None]:
        def hook(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            callback(InputEvent(key, args, kwargs, self.mask))

        return hook

    def _hook_routers(self) -> None:
        from moetool.arch.spec import RouterOutput
        from moetool.routing.observe import find_modules, router_top_k

        spec = self.spec
        routers = self.routers
        if spec.router_output is RouterOutput.EXPERTS_INPUT:
            experts = find_modules(self.model, spec, "experts" if spec.stacks else spec.experts_module)
            if set(experts) != set(routers):
                raise UnsupportedArchitectureError(
                    f"this {spec.name} model's routers and experts modules do not pair up by layer",
                    hint="the installed transformers may lay this family out differently; please report it",
                )
            for layer in routers:
                self._pair_hooks(layer, routers[layer], experts[layer])
            return
        capacity = spec.router_output.capacity_limited
        config = self.model.config
        for layer, module in routers.items():
            top_k = 0 if capacity else router_top_k(module, spec, config)
            self._handles.append(module.register_forward_hook(self._router_hook(layer, top_k, capacity)))

    def _router_hook(self, layer: int, top_k: int, capacity: bool) -> Callable[..., None]:
        from moetool.routing.observe import decode_capacity_output, decode_router_output, routing_decision

        config = self.model.config.to_dict() if any(s.weights for s in self._routes) else {}

        def hook(_module: Any, inputs: Any, output: Any) -> None:
            mask = self.mask
            decoded: dict[bool, RouteEvent] = {}
            for sub in self._routes:
                event = decoded.get(sub.weights)
                if event is None:
                    if sub.weights:
                        logits, indices, weights = routing_decision(output, self.spec, config, top_k)
                        event = RouteEvent(layer, logits, indices, mask, weights=weights)
                    elif capacity:
                        logits, indices, kept = decode_capacity_output(output, self.spec)
                        event = RouteEvent(layer, logits, indices, mask, kept=kept)
                    else:
                        logits, indices = decode_router_output(output, self.spec, top_k)
                        event = RouteEvent(
                            layer, logits.reshape(-1, logits.shape[-1]), indices.reshape(-1, indices.shape[-1]), mask
                        )
                    decoded[sub.weights] = event
                if sub.inputs and event.x is None:
                    x = inputs[0]
                    event.x = x.reshape(-1, x.shape[-1])
                sub.callback(event)

        return hook

    def _pair_hooks(self, layer: int, router: Any, experts: Any) -> None:
        """The router's logits, then the indices the experts module receives, as one event (the families
        derived from transformers, whose router output has no fixed protocol). Subscriptions with
        ``weights`` or ``inputs`` read them where the model consumes them: the hidden states and top-k
        weights the experts module is called with (``experts(hidden_states, top_k_index, top_k_weights)``)."""
        from moetool.routing.observe import experts_indices, router_logits

        pending: dict[str, Any] = {}

        def on_router(_module: Any, _inputs: Any, output: Any) -> None:
            pending["logits"] = router_logits(output)
            # The router's own top-k indices when it returns them: the experts module may receive
            # remapped ones (LongCat-Flash sends its zero-compute choices to real experts at weight 0).
            pending["indices"] = experts_indices(tuple(output) if isinstance(output, (tuple, list)) else (output,), {})

        def on_experts(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            logits = pending.pop("logits", None)
            indices = pending.pop("indices", None)
            received = experts_indices(args, kwargs)
            if indices is None:
                indices = received
            if logits is None or indices is None:
                raise RuntimeError(f"layer {layer}: could not read the router logits or the experts' top-k indices")
            event = RouteEvent(
                layer, logits.reshape(-1, logits.shape[-1]), indices.reshape(-1, indices.shape[-1]), self.mask
            )
            if any(sub.weights or sub.inputs for sub in self._routes):
                floats = [
                    v for v in (*args, *kwargs.values()) if hasattr(v, "is_floating_point") and v.is_floating_point()
                ]
                shape = received.shape if received is not None else None
                weights = next((v for v in floats if shape is not None and v.shape == shape), None)
                if not floats or (weights is None and any(sub.weights for sub in self._routes)):
                    raise UnsupportedArchitectureError(
                        f"layer {layer}: moetool cannot read the hidden states and routing weights this "
                        f"{self.spec.name} model's experts receive",
                        hint="the installed transformers may lay this family out differently; please report it",
                    )
                # What the experts compute on: the received indices and weights, and their hidden states.
                event.x = floats[0].reshape(-1, floats[0].shape[-1])
                if weights is not None and received is not None:
                    event.indices = received.reshape(-1, received.shape[-1])
                    event.weights = weights.reshape(-1, weights.shape[-1])
            for sub in self._routes:
                sub.callback(event)

        self._handles.append(router.register_forward_hook(on_router))
        self._handles.append(experts.register_forward_pre_hook(on_experts, with_kwargs=True))
