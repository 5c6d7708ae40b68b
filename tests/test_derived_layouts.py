"""Layout forms of the derived registry beyond one shape per template: blocks of a vision tower that
differ in shape (``at:`` block conditions), per-layer value lists (``each:``), rounded strided
reductions, and the tiny-config search's divisibility rules. Each derived entry is checked against
what transformers itself stores for a config the probes never saw (meta device, no weights)."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest

from tests.tiny import derived_entries, derived_tiny_config

ENTRIES = derived_entries()


def _predicted_and_stored(model_type: str, config: dict) -> tuple[dict, dict]:
    from moetool.arch.derive.probe import probe
    from moetool.arch.derived import family_from_entry
    from moetool.arch.dims import resolve_dims
    from moetool.arch.plan import planned_tensors

    spec = family_from_entry(ENTRIES[model_type])
    predicted = {t.name: t.shape for t in planned_tensors(spec, resolve_dims(spec, config))}
    _, saved = probe(model_type, config)
    return predicted, {name: s.shape for name, s in saved.items()}


@pytest.mark.skipif("deepseek_ocr2" not in ENTRIES, reason="deepseek_ocr2 is not derived")
def test_tower_blocks_follow_their_own_index_list():
    """DeepSeek-OCR-2's SAM encoder: global-attention blocks (``global_attn_indexes``) store relative
    positions over the whole image, windowed ones over a window; another index list moves them."""
    config = derived_tiny_config("deepseek_ocr2").to_dict()
    sam = config["vision_config"]["sam_config"]
    sam["num_hidden_layers"] = 4
    sam["global_attn_indexes"] = [0, 3]
    predicted, stored = _predicted_and_stored("deepseek_ocr2", config)
    assert predicted == stored
    shapes = [stored[f"model.sam_model.blocks.{i}.attn.rel_pos_h"] for i in range(4)]
    assert shapes[0] == shapes[3] != shapes[1] == shapes[2]


@pytest.mark.skipif("laguna" not in ENTRIES, reason="laguna is not derived")
def test_per_layer_head_counts_are_read_layer_by_layer():
    """Laguna's ``num_attention_heads_per_layer`` sizes each layer's query projection; without the
    list, transformers (and the registry) use ``num_attention_heads`` for every layer."""
    config = derived_tiny_config("laguna").to_dict()
    layers = config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    config["num_attention_heads_per_layer"] = [heads * (1 + i % 2) for i in range(layers)]
    predicted, stored = _predicted_and_stored("laguna", config)
    assert predicted == stored
    assert stored["model.layers.0.self_attn.q_proj.weight"] != stored["model.layers.1.self_attn.q_proj.weight"]
    del config["num_attention_heads_per_layer"]
    predicted, stored = _predicted_and_stored("laguna", config)
    assert predicted == stored


def test_rounded_reduction_fits_where_the_monomial_does_not_divide():
    from moetool.arch.derive.fit import Expr, Rounded, Term, rounded_candidates
    from moetool.arch.dims import eval_dim

    # downsample_hidden_size * num_mel_bins / 8 at the base (128 bins); three stride-2 convolutions.
    monomial = Expr((Term(Fraction(1, 8), (("d", 1), ("mel", 1))),))
    candidates = rounded_candidates(monomial)
    ceil_mel = Rounded(1, (("d", 1),), "mel", 8, "ceil")
    assert ceil_mel in candidates
    for mel in (2, 9, 128, 129):
        expected = 60 * math.ceil(mel / 8)
        assert ceil_mel.value({"d": 60, "mel": mel}) == expected
        assert eval_dim(ceil_mel.render(), {"d": 60, "mel": mel}) == expected
    # Integer coefficients and negative powers have no rounded form.
    assert rounded_candidates(Expr((Term(Fraction(2), (("d", 1),)),))) == []
    assert rounded_candidates(Expr((Term(Fraction(1, 2), (("d", 1), ("h", -1))),))) == []


def test_tiny_retry_keeps_head_widths_whole():
    from moetool.arch.derive.generate import _divisibility

    fields = {
        "hidden_size": 8192,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "moe_intermediate_size": 4096,
        "vision_config.hidden_size": 1536,
        "vision_config.num_attention_heads": 16,
    }
    pairs = set(_divisibility(fields))
    assert ("hidden_size", "num_attention_heads") in pairs
    assert ("num_attention_heads", "num_key_value_heads") in pairs
    assert ("vision_config.hidden_size", "vision_config.num_attention_heads") in pairs
    # Other widths, and fields of another sub-config, carry no constraint.
    assert ("moe_intermediate_size", "num_attention_heads") not in pairs
    assert ("vision_config.hidden_size", "num_attention_heads") not in pairs
