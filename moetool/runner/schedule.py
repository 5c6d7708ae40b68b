"""Layer-major execution: every batch goes through one decoder layer before any batch enters the next.

How, without re-implementing any model's forward: each batch runs the model's own ``forward`` in a
thread of its own. Every decoder layer's ``forward`` is replaced by a proxy that hands the call's
arguments (hidden states, masks, rotary embeddings, whatever that model passes) to the scheduler and
waits. When all batches wait at the same layer, the scheduler has that layer's weights loaded, runs
the real layer on each batch's arguments in batch order (once or several times: quantization collects
statistics, changes the weights, then runs it again), hands each thread its result and releases the
weights. The threads go on to the next layer call, computing what the model's loop computes between
layers (T5-style position biases, per-layer masks of hybrid models, an encoder's output for the
decoder). Only one thread computes at a time, in a fixed order, so results are deterministic.

The output head (``lm_head``) gets a proxy too. When logits are wanted, :meth:`LayerSchedule.logits`
lets one batch at a time through the real head and the rest of the model's forward (its own scaling
or soft-capping of logits), and yields that batch's logits before the next batch starts: one batch's
``[B, S, vocab]`` at a time, never ``[tokens, vocab]``. When they are not wanted, the proxy returns a
small placeholder and the head's weights are never loaded.

torch is imported inside the functions.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from moetool.errors import ModelLoadError

if TYPE_CHECKING:
    import torch

#: The key of the output head in ``load`` / ``release`` calls.
HEAD = "<head>"

#: How often the scheduler wakes while it waits for batch threads (so Ctrl-C is seen promptly).
_POLL_SECONDS = 0.2


class _Abort(BaseException):
    """Raised inside batch threads to unwind them when the pass is abandoned."""


@dataclass
class _Call:
    """A decoder-layer call a batch thread is waiting on."""

    batch: int
    path: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    abort: bool = False


@dataclass
class BatchInput:
    """One batch of a pass: the keyword arguments of the model's forward, and its real-token mask.

    Attributes:
        kwargs: passed to ``model(**kwargs)`` (``input_ids``, ``attention_mask``, ...).
        mask: ``[B * S]`` bool, the positions holding real tokens, flattened in the order layers see them.
        tokens: the number of real tokens.
    """

    kwargs: dict[str, Any]
    mask: Any
    tokens: int


def move(value: Any, device: torch.device, memo: dict[int, tuple[Any, Any]] | None = None) -> Any:
    """Move every tensor of a nested structure to ``device``; ``memo`` keeps one copy of a tensor met
    several times (the mask and rotary embeddings every layer receives)."""
    import torch

    if isinstance(value, torch.Tensor):
        if value.device == device:
            return value
        if memo is None:
            return value.to(device)
        hit = memo.get(id(value))
        if hit is None or hit[0] is not value:
            # The source stays in the memo too, so its id cannot be reused while the memo lives.
            hit = memo[id(value)] = (value, value.to(device))
        return hit[1]
    if isinstance(value, tuple):
        moved = [move(v, device, memo) for v in value]
        return type(value)(*moved) if hasattr(value, "_fields") else tuple(moved)
    if isinstance(value, list):
        return [move(v, device, memo) for v in value]
    if isinstance(value, dict):
        return {k: move(v, device, memo) for k, v in value.items()}
    if hasattr(value, "to_tuple") and hasattr(value, "keys"):  # transformers ModelOutput
        return type(value)(**{k: move(v, device, memo) for k, v in value.items()})
    return value


class LayerStep:
    """One decoder layer, loaded, with every batch of the pass waiting at its entrance.

    Attributes:
        position: 0 for the first layer the model calls, then 1, 2, ...
        path: the layer's module path (``model.layers.3``).
        module: the layer (weights on the compute device).
        current_batch: the batch being run (inside :meth:`run`), ``None`` otherwise.
        current_mask: that batch's real-token mask, flattened (hooks use it to skip padding).
    """

    def __init__(self, schedule: LayerSchedule, position: int, path: str, module: Any, calls: list[_Call]) -> None:
        self._schedule = schedule
        self.position = position
        self.path = path
        self.module = module
        self._calls = calls
        self.current_batch: int | None = None
        self.current_mask: Any = None
        self._kept: set[int] = set()

    @property
    def kept(self) -> bool:
        """Whether every batch has its result (the layer ran on it with ``keep=True``)."""
        return len(self._kept) == len(self._calls)

    def finish(self) -> None:
        """Run the batches that have no result yet (the layer as it is now)."""
        missing = [call.batch for call in self._calls if call.batch not in self._kept]
        if missing:
            self.run(keep=True, only=set(missing))

    @property
    def num_batches(self) -> int:
        return len(self._calls)

    @property
    def tokens(self) -> int:
        """Real tokens over all batches of the pass."""
        return sum(self._schedule.inputs[c.batch].tokens for c in self._calls)

    def run(
        self,
        *,
        keep: bool,
        before_batch: Callable[[int], None] | None = None,
        only: Collection[int] | None = None,
    ) -> None:
        """Run the layer over every batch (or those in ``only``), in batch order.

        Args:
            keep: its outputs become the batches' results (what the next layer receives); without
                ``keep`` the outputs are dropped (a statistics-collecting pass).
            before_batch: called with each batch index before that batch runs.
            only: the batches to run (all when ``None``). A batch not run with ``keep`` by the time the
                consumer moves on is run then.
        """
        import torch

        schedule = self._schedule
        forward = self.module.__dict__.pop("forward", None)
        try:
            with torch.inference_mode():
                for call in self._calls:
                    if only is not None and call.batch not in only:
                        continue
                    self.current_batch = call.batch
                    self.current_mask = schedule.device_mask(call.batch)
                    if before_batch is not None:
                        before_batch(call.batch)
                    memo = schedule.memo(call.batch)
                    args = move(call.args, schedule.compute_device, memo)
                    kwargs = move(call.kwargs, schedule.compute_device, memo)
                    output = self.module(*args, **kwargs)
                    if keep:
                        call.result = move(output, schedule.hidden_device)
                        self._kept.add(call.batch)
                    del output, args, kwargs
        finally:
            if forward is not None:
                self.module.forward = forward
            self.current_batch = None
            self.current_mask = None

    def __repr__(self) -> str:
        return f"LayerStep({self.position}, {self.path!r}, batches={len(self._calls)})"


class LayerSchedule:
    """Runs a set of batches through a model layer by layer (see the module docstring).

    Args:
        model: the transformers model (a skeleton whose pieces are loaded by ``load``/``release``, or a
            model already in memory with no-op callbacks).
        layer_paths: the decoder layers' module paths.
        inputs: the batches.
        compute_device: where layers run.
        hidden_device: where activations live between layers (the compute device, or the CPU).
        load / release: called with a layer path (or :data:`HEAD`) to put its weights on the compute
            device / free them.
        keep_logits: stop the batches at the output head, so that :meth:`logits` yields each batch's logits
            (``True``: every batch; a collection: those batches).
    """

    def __init__(
        self,
        model: Any,
        layer_paths: Sequence[str],
        inputs: Sequence[BatchInput],
        *,
        compute_device: torch.device,
        hidden_device: torch.device,
        load: Callable[[str], None],
        release: Callable[[str], None],
        keep_logits: bool | Collection[int] = False,
    ) -> None:
        self.model = model
        self.layer_paths = list(layer_paths)
        self.inputs = list(inputs)
        self.compute_device = compute_device
        self.hidden_device = hidden_device
        self._load = load
        self._release = release
        # Which batches stop at the head for their logits (all, none, or the given ones).
        if keep_logits is True:
            self._logit_batches: set[int] = set(range(len(self.inputs)))
        elif keep_logits is False:
            self._logit_batches = set()
        else:
            self._logit_batches = set(keep_logits)
        self.keep_logits = bool(self._logit_batches)
        self._at_head: list[_Call] | None = None
        self._done_logits: dict[int, Any] = {}
        self._events: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._pending: list[_Call] = []
        self._memos: dict[int, dict[int, tuple[Any, Any]]] = {}
        self._masks: dict[int, Any] = {}
        self._finished: set[int] = set()
        self._started = False
        self._saved: dict[str, Any] = {}

    # ------------------------------------------------------------------ per-batch caches

    def memo(self, batch: int) -> dict[int, tuple[Any, Any]]:
        """Tensors of a batch already moved to the compute device (shared by every layer call)."""
        if self.compute_device == self.hidden_device:
            return {}
        return self._memos.setdefault(batch, {})

    def device_mask(self, batch: int) -> Any:
        mask = self._masks.get(batch)
        if mask is None:
            mask = self._masks[batch] = self.inputs[batch].mask.to(self.compute_device)
        return mask

    # ------------------------------------------------------------------ proxies

    def _install(self) -> None:
        for path in self.layer_paths:
            module = self.model.get_submodule(path)
            self._saved[path] = module.__dict__.get("forward")
            module.forward = self._layer_proxy(path)
        head = self.model.get_output_embeddings()
        if head is not None:
            self._saved["<head>"] = head.__dict__.get("forward")
            head.forward = self._head_proxy

    def _uninstall(self) -> None:
        for path in self.layer_paths:
            module = self.model.get_submodule(path)
            module.__dict__.pop("forward", None)
            if self._saved.get(path) is not None:
                module.forward = self._saved[path]
        head = self.model.get_output_embeddings()
        if head is not None:
            head.__dict__.pop("forward", None)
            if self._saved.get("<head>") is not None:
                head.forward = self._saved["<head>"]

    def _layer_proxy(self, path: str) -> Callable[..., Any]:
        def proxy(*args: Any, **kwargs: Any) -> Any:
            call = _Call(_batch.index, path, args, kwargs)
            self._events.put(("layer", call))
            call.done.wait()
            if call.abort:
                raise _Abort
            result = call.result
            call.result = call.args = call.kwargs = None  # type: ignore[assignment]
            return result

        return proxy

    def _head_proxy(self, hidden: Any, *args: Any, **kwargs: Any) -> Any:
        if _batch.index not in self._logit_batches:
            # A placeholder the model's own post-processing (scaling, soft-capping) can run on cheaply.
            return hidden.new_zeros((*hidden.shape[:-1], 1))
        call = _Call(_batch.index, HEAD, (hidden, *args), kwargs)
        self._events.put(("layer", call))
        call.done.wait()
        if call.abort:
            raise _Abort
        result = call.result
        call.result = call.args = call.kwargs = None  # type: ignore[assignment]
        return result

    def _thread_main(self, batch: int) -> None:
        import torch

        _batch.index = batch
        try:
            with torch.inference_mode():
                output = self.model(**self.inputs[batch].kwargs)
            logits = None
            if batch in self._logit_batches:
                logits = output.logits if hasattr(output, "logits") else output[0]
            del output
            self._events.put(("done", batch, logits))
        except _Abort:
            pass
        except BaseException as exc:  # handed to the scheduler, which re-raises it
            self._events.put(("error", batch, exc))

    # ------------------------------------------------------------------ the pass

    def start(self) -> None:
        """Install the proxies and start one thread per batch (each runs the model's forward)."""
        if self._started:
            return
        self._install()
        self._started = True
        for batch in range(len(self.inputs)):
            thread = threading.Thread(
                target=self._thread_main, args=(batch,), name=f"moetool-batch-{batch}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def steps(self) -> Iterator[LayerStep]:
        """Yield each decoder layer as the batches reach it; its weights are loaded while it is yielded.

        A layer the consumer did not run with ``keep=True`` is run so when the consumer moves on. The
        generator ends when the batches have finished their forward (or, with ``keep_logits``, wait at the
        output head: then :meth:`logits` follows).
        """
        self.start()
        position = 0
        while True:
            calls = self._gather()
            if calls is None or calls[0].path == HEAD:
                self._at_head = calls
                return
            path = calls[0].path
            self._load(path)
            try:
                step = LayerStep(self, position, path, self.model.get_submodule(path), calls)
                yield step
                step.finish()
            finally:
                self._release(path)
            for call in calls:
                call.done.set()
            position += 1

    def logits(self) -> Iterator[tuple[int, Any]]:
        """Yield ``(batch, logits)`` one batch at a time, computed by the model's own head and tail.

        Only one batch's ``[B, S, vocab]`` logits exist at a time: the head runs for a batch, its thread
        finishes the forward (the family's scaling or soft-capping included), the logits are yielded,
        and only then does the next batch go through the head.
        """
        import torch

        if not self.keep_logits:
            raise RuntimeError("logits() needs keep_logits=True")
        calls = self._at_head
        if calls is None:
            return
        head = self.model.get_output_embeddings()
        self._load(HEAD)
        try:
            forward = head.__dict__.pop("forward", None)
            try:
                for call in calls:
                    with torch.inference_mode():
                        hidden = move(call.args[0], self.compute_device)
                        call.result = head(hidden)
                    del hidden
                    self._pending = [c for c in calls if not c.done.is_set()]
                    call.done.set()
                    logits = self._wait_done(call.batch)
                    yield call.batch, logits
                    del logits
            finally:
                if forward is not None:
                    head.forward = forward
        finally:
            self._release(HEAD)
        self._at_head = None

    def _wait_done(self, batch: int) -> Any:
        while True:
            if batch in self._done_logits:
                return self._done_logits.pop(batch)
            event = self._next_event()
            if event is None:
                continue
            self._handle_terminal(event)

    def _next_event(self) -> tuple[Any, ...] | None:
        try:
            return self._events.get(timeout=_POLL_SECONDS)
        except queue.Empty:
            return None

    def _handle_terminal(self, event: tuple[Any, ...]) -> _Call | None:
        kind = event[0]
        if kind == "error":
            raise event[2]
        if kind == "done":
            self._finished.add(event[1])
            if event[2] is not None:
                self._done_logits[event[1]] = event[2]
            return None
        return event[1]

    def _gather(self) -> list[_Call] | None:
        """Wait until every unfinished batch waits at the same place; ``None`` when all finished."""
        waiting: dict[int, _Call] = {}
        while len(waiting) + len(self._finished) < len(self.inputs):
            event = self._next_event()
            if event is None:
                continue
            call = self._handle_terminal(event)
            if call is not None:
                waiting[call.batch] = call
        if not waiting:
            return None
        where = next(iter(waiting.values())).path
        early = self._finished & self._logit_batches if where == HEAD else self._finished
        if early:
            raise ModelLoadError(
                f"batches {sorted(early)} finished the forward while others wait at {where}",
                hint="this model does not run every batch through the same layers; pass --whole-model",
                code="STREAM_UNSUPPORTED",
            )
        paths = {call.path for call in waiting.values()}
        if len(paths) != 1:
            raise ModelLoadError(
                f"the batches wait at different layers ({', '.join(sorted(paths))})",
                hint="this model does not run every batch through the same layers; pass --whole-model",
                code="STREAM_UNSUPPORTED",
            )
        calls = [waiting[b] for b in sorted(waiting)]
        self._pending = calls
        return calls

    def close(self) -> None:
        """Unwind the threads still waiting (after an error, Ctrl-C or an early stop), restore the model."""
        if not self._started:
            return
        for call in self._pending:
            if not call.done.is_set():
                call.abort = True
                call.done.set()
        # Threads may post more calls while unwinding; answer them with an abort until all exit.
        while any(t.is_alive() for t in self._threads):
            event = self._next_event()
            if event is not None and event[0] == "layer":
                event[1].abort = True
                event[1].done.set()
        self._threads.clear()
        self._memos.clear()
        self._masks.clear()
        self._done_logits.clear()
        self._uninstall()
        self._started = False

    def __enter__(self) -> LayerSchedule:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _BatchLocal(threading.local):
    index: int = -1


_batch = _BatchLocal()
