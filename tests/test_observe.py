"""The one observation path (moetool.runner.observe): events, padding, hook removal, and no other hooks."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from moetool.arch.registry import family_for_config
from moetool.runner.observe import InputEvent, Observer, RouteEvent
from tests.tiny import tiny_config

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class FakeBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    domains: list


def _model(model_type: str = "mixtral"):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(model_type)).eval()


def _batches(vocab: int) -> list[FakeBatch]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for real in ((6, 4), (3, 6)):
        ids = torch.randint(vocab, (2, 6), generator=gen)
        mask = torch.zeros(2, 6, dtype=torch.long)
        for row, length in enumerate(real):
            mask[row, :length] = 1
        out.append(FakeBatch(ids, mask, [None, None]))
    return out


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_route_events_carry_the_mask_the_weights_and_the_routed_input():
    model = _model()
    spec = family_for_config(model.config.to_dict())
    batches = _batches(model.config.vocab_size)
    events: list[RouteEvent] = []
    observer = Observer(model, spec).on_route(events.append, weights=True, inputs=True)
    observer.run(batches)
    real = sum(int(b.attention_mask.sum()) for b in batches)
    assert observer.tokens == real
    # One mask per batch, shared by its layers' events (made once, not per layer).
    assert len({id(e.mask) for e in events}) == len(batches)
    assert {e.layer for e in events} == set(observer.layers)
    for layer in observer.layers:
        mine = [e for e in events if e.layer == layer]
        assert len(mine) == len(batches)
        assert sum(e.masked(e.x).shape[0] for e in mine) == real
        for event in mine:
            assert event.x.shape[-1] == model.config.hidden_size
            assert event.weights.shape == event.indices.shape
            # Mixtral renormalises its top-k weights.
            torch.testing.assert_close(event.weights.sum(-1), torch.ones(event.weights.shape[0]))
    assert _hooks(model) == 0


def test_both_decodings_agree_on_the_choices():
    model = _model()
    spec = family_for_config(model.config.to_dict())
    plain: list[RouteEvent] = []
    weighted: list[RouteEvent] = []
    Observer(model, spec).on_route(plain.append).on_route(weighted.append, weights=True).run(
        _batches(model.config.vocab_size)
    )
    assert len(plain) == len(weighted)
    for a, b in zip(plain, weighted, strict=True):
        assert a.weights is None and a.x is None
        torch.testing.assert_close(a.indices, b.indices)


def test_input_events_drop_padding_and_hooks_go_away_on_error():
    model = _model()
    spec = family_for_config(model.config.to_dict())
    observer = Observer(model, spec)
    routers = observer.routers
    rows: list[int] = []

    def on_input(event: InputEvent) -> None:
        rows.append(event.masked(event.args[0]).shape[0])
        if len(rows) == 3:
            raise RuntimeError("consumer failed")

    observer.on_input(routers, on_input)
    with pytest.raises(RuntimeError, match="consumer failed"):
        observer.run(_batches(model.config.vocab_size))
    assert _hooks(model) == 0
    assert rows[0] == 10  # the first batch's real tokens


def test_no_module_hooks_the_model_but_the_observer():
    """Consumers subscribe to moetool.runner.observe; nothing else registers forward hooks."""
    # arch/derive/routing.py records one forward of a model it is deriving a family for (no runner,
    # no batches): it is how a router's protocol is discovered, before there is a family to observe.
    allowed = {"moetool/runner/observe.py", "moetool/arch/derive/routing.py"}
    pattern = re.compile(r"register_forward(_pre)?_hook")
    found = {
        str(path.relative_to(ROOT))
        for path in (ROOT / "moetool").rglob("*.py")
        if pattern.search(path.read_text(encoding="utf-8"))
    }
    assert found <= allowed, sorted(found - allowed)
