"""Pure pieces of moetool.merge on hand-made inputs: alignment, scores, grouping, combining, router rows, layouts."""

from __future__ import annotations

import pytest
import torch

from moetool.merge import align, combine, grouping, router, scores
from moetool.merge.layout import Experts


def random_experts(n: int = 4, width: int = 6, hidden: int = 5, seed: int = 0) -> Experts:
    g = torch.Generator().manual_seed(seed)
    return Experts(
        torch.randn(n, width, hidden, generator=g),
        torch.randn(n, width, hidden, generator=g),
        torch.randn(n, hidden, width, generator=g),
    )


def silu(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(x)


# ----------------------------------------------------------------------------- alignment


@pytest.mark.parametrize("width", [1, 7, 64])
def test_align_recovers_a_random_permutation_exactly(width):
    experts = random_experts(n=1, width=width, hidden=16, seed=width)
    reference = experts.ffn(0)
    shuffle = torch.randperm(width, generator=torch.Generator().manual_seed(1))
    shuffled = align.permute(reference, shuffle)
    perm = align.match_neurons(reference, shuffled)
    realigned = align.permute(shuffled, perm)
    for a, b in zip(realigned, reference, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    # perm undoes the shuffle: neuron i of the aligned expert is neuron perm[i] of the shuffled one.
    assert torch.equal(shuffle[perm], torch.arange(width))


def test_permuting_neurons_keeps_the_function():
    experts = random_experts(n=1, width=8, hidden=5)
    ffn = experts.ffn(0)
    x = torch.randn(3, 5)
    perm = torch.randperm(8)
    from moetool.merge.ffn import forward

    assert torch.allclose(forward(ffn, x, silu), forward(align.permute(ffn, perm), x, silu), atol=1e-6)


def test_merging_a_permuted_copy_with_alignment_is_exact():
    base = random_experts(n=1, width=10, hidden=6)
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(3))
    shuffled = align.permute(base.ffn(0), perm)
    pair = Experts(
        torch.stack([base.gate[0], shuffled[0]]),
        torch.stack([base.up[0], shuffled[1]]),
        torch.stack([base.down[0], shuffled[2]]),
    )
    merged = combine.merge_group(pair, [0, 1], [0.3, 0.7], align=True)
    assert all(
        torch.allclose(a, b, atol=1e-6)
        for a, b in zip(merged[:3], (base.gate[0], base.up[0], base.down[0]), strict=True)
    )
    unaligned = combine.merge_group(pair, [0, 1], [0.3, 0.7], align=False)
    assert not torch.allclose(unaligned[0], base.gate[0])


# ----------------------------------------------------------------------------- scores


def test_frequency_and_soft_frequency_are_the_inputs():
    assert scores.frequency([3, 0, 7]) == [3.0, 0.0, 7.0]
    assert scores.soft_frequency([0.2, 0.5, 0.3]) == [0.2, 0.5, 0.3]


def test_reap_is_the_mean_contribution_per_routed_token():
    assert scores.reap([6.0, 0.0, 1.5], [3, 0, 1]) == [2.0, 0.0, 1.5]


def test_contribution_norms_on_hand_made_experts():
    # Expert e: gate = up = identity rows picking x[0], down maps the neuron to output axis 0 with scale s_e.
    # With x = (a, 0), E_e(x) = s_e * silu(a) * a on axis 0.
    hidden, width = 2, 1
    gate = torch.zeros(2, width, hidden)
    gate[:, 0, 0] = 1.0
    up = gate.clone()
    down = torch.zeros(2, hidden, width)
    down[0, 0, 0] = 1.0
    down[1, 0, 0] = 3.0
    experts = Experts(gate, up, down)
    x = torch.tensor([[1.0, 0.0], [2.0, 0.0], [1.0, 0.0]])
    indices = torch.tensor([[0, 1], [0, 1], [1, 0]])
    weights = torch.tensor([[0.5, 0.5], [0.25, 0.75], [1.0, 0.0]])
    value = lambda a: a * torch.sigmoid(torch.tensor(a)).item() * a  # noqa: E731 - silu(a) * a
    sums, counts = scores.contribution_norms(experts, x, indices, weights, silu)
    assert counts == [3, 3]
    expected0 = 0.5 * value(1.0) + 0.25 * value(2.0) + 0.0
    expected1 = 3 * (0.5 * value(1.0) + 0.75 * value(2.0) + 1.0 * value(1.0))
    assert sums == pytest.approx([expected0, expected1], rel=1e-5)
    # REAP ranks expert 1 first although both were chosen equally often.
    assert scores.reap(sums, counts)[1] > scores.reap(sums, counts)[0]
    # Llama-4 style: the weight scales the input, so the contribution is E(w x), not w E(x).
    sums_in, _ = scores.contribution_norms(experts, x, indices, weights, silu, scales_input=True)
    assert sums_in[0] == pytest.approx(value(0.5) + value(0.5), rel=1e-5)
    # EAN: the same norms without the routing weight, summed (every routed token counts fully).
    norms, _ = scores.contribution_norms(experts, x, indices, weights, silu, weighted=False)
    expected = [value(1.0) + value(2.0) + value(1.0), 3 * (value(1.0) + value(2.0) + value(1.0))]
    assert scores.ean(norms) == pytest.approx(expected, rel=1e-5)


def test_method_registry_drives_the_options():
    from moetool.merge.api import METHODS, NEEDS_SAMPLE, PRUNING_METHODS
    from moetool.merge.methods import METHODS as REGISTRY
    from moetool.merge.methods import PRUNE

    assert set(REGISTRY) == set(METHODS)
    assert "ean" in PRUNING_METHODS and REGISTRY["ean"].kind == PRUNE and "ean" in NEEDS_SAMPLE
    for method in REGISTRY.values():
        assert (method.select is None) != (method.group is None), method.name


# ----------------------------------------------------------------------------- grouping


def test_top_m_breaks_ties_by_index_and_returns_sorted():
    assert grouping.top_m([1.0, 5.0, 5.0, 0.0], 2) == [1, 2]
    assert grouping.top_m([3.0, 1.0, 2.0], 2) == [0, 2]


def test_around_anchors_assigns_to_the_most_similar_anchor():
    sim = torch.tensor(
        [
            [1.0, 0.9, 0.1, 0.2],
            [0.9, 1.0, 0.0, 0.1],
            [0.1, 0.0, 1.0, 0.8],
            [0.2, 0.1, 0.8, 1.0],
        ]
    )
    groups = grouping.around_anchors(sim, [10, 1, 2, 20], 2)
    assert groups == [[0, 1], [3, 2]]  # anchors 0 and 3 (most used), each leads its group
    assert grouping.weights_within(groups, [10, 1, 2, 20]) == [
        pytest.approx([10 / 11, 1 / 11]),
        pytest.approx([20 / 22, 2 / 22]),
    ]


def test_cluster_joins_the_closest_experts():
    sim = torch.tensor(
        [
            [1.0, 0.1, 0.95, 0.0],
            [0.1, 1.0, 0.0, 0.9],
            [0.95, 0.0, 1.0, 0.1],
            [0.0, 0.9, 0.1, 1.0],
        ]
    )
    assert grouping.cluster(sim, [1, 1, 5, 1], 2) == [[1, 3], [2, 0]]
    assert grouping.cluster(sim, [1, 1, 1, 1], 4) == [[0], [1], [2], [3]]


def test_similarities():
    rows = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    sim = grouping.row_similarity(rows)
    assert sim[0, 1] == pytest.approx(1.0) and sim[0, 2] == pytest.approx(0.0)
    logits = torch.tensor([[1.0, 2.0, -1.0], [2.0, 4.0, -2.0], [0.0, 0.0, 0.0]])
    col = grouping.column_similarity(logits)
    assert col[0, 1] == pytest.approx(1.0) and col[0, 2] == pytest.approx(-1.0)


# ----------------------------------------------------------------------------- router rows


def test_router_rows_select_and_merge():
    weight = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    assert torch.equal(router.select_rows(weight, [3, 1]), weight[[3, 1]])
    merged = router.merge_rows(weight, [[0, 2], [1, 3]], [[0.5, 0.5], [0.25, 0.75]])
    assert torch.allclose(merged, torch.stack([(weight[0] + weight[2]) / 2, 0.25 * weight[1] + 0.75 * weight[3]]))
    bias = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert torch.equal(router.select_rows(bias, [2]), torch.tensor([3.0]))


def test_refit_reproduces_an_aggregated_router():
    # Old router: 4 experts; experts {0,1} and {2,3} merge. A new 2-row router can match the aggregated
    # distribution exactly when the old rows of a pair are equal (log-sum-exp of equal logits is linear).
    g = torch.Generator().manual_seed(0)
    hidden = 6
    rows = torch.randn(2, hidden, generator=g)
    old = torch.stack([rows[0], rows[0], rows[1], rows[1]])
    x = torch.randn(500, hidden, generator=g)
    init = torch.randn(2, hidden, generator=g)  # a bad start
    fitted, losses = router.refit(x, x @ old.T, [0, 0, 1, 1], init)
    assert losses["loss_after"] < losses["loss_before"]
    new_probs = torch.softmax(x @ fitted.T, dim=-1)
    target = router.aggregate(torch.softmax(x @ old.T, dim=-1), [0, 0, 1, 1], 2)
    assert torch.allclose(new_probs, target, atol=1e-3)


def test_refit_never_returns_something_worse():
    x = torch.randn(50, 4)
    logits = torch.randn(50, 3)
    init = torch.zeros(2, 4)
    fitted, losses = router.refit(x, logits, [0, 1, 1], init, iterations=5)
    assert losses["loss_after"] <= losses["loss_before"]
    assert fitted.shape == (2, 4)


# ----------------------------------------------------------------------------- dense strategies


def test_dense_concat_is_the_expected_gate_mixture():
    experts = random_experts(n=3, width=4, hidden=5)
    coefficients = [0.5, 0.3, 0.2]
    ffn, used = combine.dense_concat(experts, coefficients, width=12, weight_sum=1.0)
    assert used == [0, 1, 2]
    from moetool.merge.ffn import expert_forward, forward

    x = torch.randn(7, 5)
    expected = sum(c * expert_forward(experts, e, x, silu) for e, c in enumerate(coefficients))
    assert torch.allclose(forward(ffn, x, silu), expected, atol=1e-5)
    # A narrower width keeps the experts with the largest coefficients, renormalised.
    narrow, used = combine.dense_concat(experts, coefficients, width=6, weight_sum=1.0)
    assert used == [0, 1] and narrow[0].shape == (6, 5)


def test_pad_adds_exact_zero_neurons():
    experts = random_experts(n=1, width=3, hidden=4)
    ffn = experts.ffn(0)
    padded = combine.pad(ffn, 8)
    from moetool.merge.ffn import forward

    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    assert padded[0].shape == (8, 4) and padded[2].shape == (4, 8)
    assert torch.allclose(forward(padded, x, silu), forward(ffn, x, silu), atol=1e-5)
    with pytest.raises(ValueError):
        combine.pad(ffn, 2)


def test_dense_top1_and_average():
    experts = random_experts(n=3, width=4, hidden=5)
    ffn, used = combine.dense_top1(experts, [1, 9, 3], 0.5)
    assert used == [1] and torch.equal(ffn[0], experts.gate[1]) and torch.allclose(ffn[2], 0.5 * experts.down[1])
    same = Experts(experts.gate[[0, 0, 0]], experts.up[[0, 0, 0]], experts.down[[0, 0, 0]])
    avg, order = combine.dense_average(same, [1, 2, 3], 1.0)
    assert order == [2, 1, 0]
    assert all(
        torch.allclose(a, b, atol=1e-6) for a, b in zip(avg[:3], (same.gate[0], same.up[0], same.down[0]), strict=True)
    )


# ----------------------------------------------------------------------------- output search


def test_search_keeps_the_set_that_reproduces_the_layer():
    from moetool.merge.router import RoutingRule
    from moetool.merge.search import LayerOutputs, best_subset

    # Experts 0 and 1 compute the same thing (u) and take most tokens; expert 2 (v) takes a few.
    # Frequency keeps {0, 1} and loses v; the search keeps one of the twins and expert 2, exactly.
    n, hidden = 12, 3
    u = torch.randn(n, hidden, generator=torch.Generator().manual_seed(0))
    v = torch.randn(n, hidden, generator=torch.Generator().manual_seed(1))
    outputs = torch.stack([u, u, v], dim=1)
    to_v = torch.arange(n) >= 9
    logits = torch.where(to_v[:, None], torch.tensor([0.0, -0.1, 5.0]), torch.tensor([5.0, 4.9, 0.0]))
    target = torch.where(to_v[:, None], v, u)
    counts = [9, 9, 3]  # top-2: the twins are chosen together on 9 tokens
    rule = RoutingRule("softmax", top_k=1)
    layer = LayerOutputs(outputs, target, logits)
    assert grouping.top_m(counts, 2) == [0, 1]
    assert layer.error([0, 1], rule) > 0.1
    kept, error, exhaustive = best_subset(layer, 3, 2, rule)
    assert kept == [0, 2] and error == pytest.approx(0.0, abs=1e-9) and exhaustive
    greedy, _, exhaustive = best_subset(layer, 3, 2, rule, limit=1)
    assert not exhaustive and greedy in ([0, 2], [1, 2])


def test_routing_rules():
    from moetool.merge.router import RoutingRule

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    idx, w = RoutingRule("softmax", 2).weights(logits)
    assert idx.tolist() == [[0, 1]] and w.sum().item() == pytest.approx(1.0)
    idx, w = RoutingRule("softmax", 2, renormalize=False, scaling=2.0).weights(logits)
    assert w.tolist()[0] == pytest.approx((2 * torch.softmax(logits, -1)[0, :2]).tolist())
    idx, w = RoutingRule("topk_softmax", 2).weights(logits)
    assert w.tolist()[0] == pytest.approx(torch.softmax(torch.tensor([2.0, 1.0]), -1).tolist())
    bias = torch.tensor([0.0, 0.0, 0.0, 10.0])
    idx, w = RoutingRule("sigmoid", 2, bias=bias).weights(logits)
    assert sorted(idx.tolist()[0]) == [0, 3]  # the bias changes the choice, not the weights
    assert w.sum().item() == pytest.approx(1.0)


def test_refit_to_outputs_improves_a_bad_router():
    from moetool.merge.router import RoutingRule, refit_to_outputs

    g = torch.Generator().manual_seed(0)
    n, hidden, m = 400, 6, 3
    x = torch.randn(n, hidden, generator=g)
    outputs = torch.randn(n, m, hidden, generator=g)
    true_rows = torch.randn(m, hidden, generator=g) * 3
    rule = RoutingRule("softmax", 1)
    idx, w = rule.weights(x @ true_rows.T)
    target = (w[:, :, None] * outputs.gather(1, idx[:, :, None].expand(-1, -1, hidden))).sum(1)
    fitted, losses = refit_to_outputs(x, outputs, target, torch.randn(m, hidden, generator=g), rule, steps=300)
    assert losses["loss_after"] < 0.5 * losses["loss_before"]
    assert fitted.shape == (m, hidden)


# ----------------------------------------------------------------------------- two-matrix experts with biases


def _two_matrix(n: int, width: int, hidden: int, seed: int = 0) -> Experts:
    """NLLB-MoE-like experts: ``fc2(relu(fc1 x + b1)) + b2``."""
    g = torch.Generator().manual_seed(seed)
    return Experts(
        None,
        torch.randn(n, width, hidden, generator=g),
        torch.randn(n, hidden, width, generator=g),
        up_bias=torch.randn(n, width, generator=g),
        down_bias=torch.randn(n, hidden, generator=g),
    )


def test_two_matrix_expert_forward_is_the_mlp():
    from moetool.merge.ffn import expert_forward

    experts = _two_matrix(2, 6, 4)
    x = torch.randn(5, 4)
    expected = torch.relu(x @ experts.up[1].T + experts.up_bias[1]) @ experts.down[1].T + experts.down_bias[1]
    assert torch.allclose(expert_forward(experts, 1, x, torch.relu), expected, atol=1e-6)


def test_two_matrix_alignment_and_merge_carry_the_biases():
    """Neurons and their biases move together; a permuted copy merges back exactly; the output bias
    is averaged with the same weights; pruning keeps every tensor of the kept experts."""
    base = _two_matrix(1, 9, 5, seed=2)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(4))
    shuffled = align.permute(base.ffn(0), perm)
    x = torch.randn(7, 5)
    from moetool.merge.ffn import forward

    assert torch.allclose(forward(shuffled, x, torch.relu), forward(base.ffn(0), x, torch.relu), atol=1e-5)
    pair = Experts.stack([base.ffn(0), shuffled._replace(down_bias=shuffled.down_bias + 1.0)])
    merged = combine.merge_experts(pair, [[0, 1]], [[0.25, 0.75]], align=True)
    assert merged.gate is None and merged.up_bias is not None
    assert torch.allclose(merged.up[0], base.up[0], atol=1e-6)
    assert torch.allclose(merged.up_bias[0], base.up_bias[0], atol=1e-6)
    assert torch.allclose(merged.down_bias[0], base.down_bias[0] + 0.75, atol=1e-6)
    kept = _two_matrix(4, 3, 2).select([3, 1])
    assert kept.num_experts == 2 and kept.up_bias.shape == (2, 3) and kept.down_bias.shape == (2, 2)
    assert combine.pad(base.ffn(0), 12).up_bias.shape == (12,)
