"""The one reading of routed-expert templates (moetool.arch.experts) that merge and quantize share."""

from __future__ import annotations

import pytest

from moetool.arch.derived import derived_families
from moetool.arch.experts import expert_roles, layer_prefix, roles_by_stack, roles_of
from moetool.arch.families import FAMILIES
from moetool.arch.spec import T
from moetool.errors import UnsupportedArchitectureError

ALL = [spec for spec in [*FAMILIES, *derived_families()] if spec.routed_experts]


def _roles(spec):
    if spec.stacks:
        return roles_by_stack(spec.routed_experts, family=spec.name)
    return [expert_roles(spec)]


@pytest.mark.parametrize("spec", ALL, ids=lambda s: s.name)
def test_every_registry_family_is_read(spec):
    """Each family's experts are read, or the commands that rewrite them refuse it with a reason."""
    try:
        readings = _roles(spec)
    except UnsupportedArchitectureError as exc:
        assert spec.derived and "cannot tell its routed experts' projections apart" in exc.message
        for command in ("merge", "quantize"):
            assert len(spec.capabilities.get(command) or "") > 20, command
        return
    for roles in readings:
        names = {r.role for r in roles.roles}
        assert names in ({"gate", "up", "down"}, {"gate_up", "down"}, {"up", "down"})
        # Every template is used exactly once, as a matrix or a bias.
        stack_templates = [
            t for t in spec.routed_experts if not spec.stacks or t.stack == roles.roles[0].template.stack
        ]
        assert sorted(t.name for t in roles.templates) == sorted(t.name for t in stack_templates)
        for role in roles.roles:
            stem = role.template.name
            if role.role == "down":
                assert any(s in stem for s in ("down", "w2", "wo", "fc2", "output_linear")), stem


def test_hand_written_per_expert_in_swiglu_order():
    mixtral = next(s for s in FAMILIES if s.name == "mixtral")
    roles = expert_roles(mixtral)
    assert [r.role for r in roles.roles] == ["gate", "up", "down"]
    assert roles.width == "I" and roles.gated and roles.plain and not roles.fused and not roles.has_bias


def test_fused_layouts():
    by_name = {s.name: s for s in FAMILIES}
    dbrx = expert_roles(by_name["dbrx"])
    assert [(r.role, r.transposed, r.flat) for r in dbrx.roles] == [
        ("gate", False, True),
        ("up", False, True),
        ("down", True, True),
    ]
    llama4 = expert_roles(by_name["llama4"])
    assert [(r.role, r.transposed) for r in llama4.roles] == [("gate_up", True), ("down", True)]
    gpt_oss = expert_roles(by_name["gpt_oss"])
    assert [r.bias.name for r in gpt_oss.roles] == ["mlp.experts.gate_up_proj_bias", "mlp.experts.down_proj_bias"]
    granite = expert_roles(by_name["granitemoe"])
    assert granite.plain and granite.fused and granite.width == "I"


def test_derived_per_expert_read_by_name_not_order():
    # transformers' names sorted alphabetically put down first; roles come from the names.
    roles = roles_of(
        [
            T("mlp.experts.{E}.down_proj.weight", ("H", "W")),
            T("mlp.experts.{E}.gate_proj.weight", ("W", "H")),
            T("mlp.experts.{E}.up_proj.weight", ("W", "H")),
        ]
    )
    assert [r.role for r in roles.roles] == ["down", "gate", "up"] and roles.width == "W"


def test_switch_two_matrix_experts_per_stack():
    switch = next(s for s in derived_families() if s.name == "switch_transformers")
    for stack in (0, 1):
        roles = roles_of([t for t in switch.routed_experts if t.stack == stack])
        assert [r.role for r in roles.roles] == ["up", "down"] and not roles.gated and roles.width == "d_ff"
    nllb = next(s for s in derived_families() if s.name == "nllb-moe")
    decoder = roles_of([t for t in nllb.routed_experts if t.stack == 1])
    assert decoder.width == "decoder_ffn_dim" and [r.bias.name.rsplit(".", 2)[-2] for r in decoder.roles] == [
        "fc1",
        "fc2",
    ]


@pytest.mark.parametrize(
    "templates",
    [
        [],
        [T("mlp.experts.{E}.gate_proj.weight", ("I", "H")), T("mlp.experts.{E}.down_proj.weight", ("H", "I"))],
        [T("mlp.experts.{E}.a.weight", ("I", "H")), T("mlp.experts.{E}.b.weight", ("H", "I"))],
        [T("mlp.experts.{E}.up_proj.weight", ("I", "H")), T("mlp.experts.{E}.down_proj.weight", ("H", "J"))],
        [T("mlp.experts.{E}.up_proj.weight", ("I", "H", "X")), T("mlp.experts.{E}.down_proj.weight", ("H", "I"))],
        [T("mlp.experts.gate_up_proj", ("E", "2*I", "H")), T("mlp.experts.{E}.down_proj.weight", ("H", "I"))],
        [
            T("mlp.experts.{E}.up_proj.weight", ("I", "H")),
            T("mlp.experts.{E}.down_proj.weight", ("H", "I")),
            T("mlp.experts.{E}.extra.bias", ("I",)),
        ],
    ],
    ids=["none", "no-up", "unnamed", "width-mismatch", "3d-per-expert", "mixed", "orphan-bias"],
)
def test_unreadable_templates_are_refused(templates):
    with pytest.raises(UnsupportedArchitectureError, match="cannot tell its routed experts' projections apart"):
        roles_of(templates, family="x")


def test_layer_prefix_numbers_across_stacks():
    from moetool.arch.dims import resolve_dims

    switch = next(s for s in derived_families() if s.name == "switch_transformers")
    config = {
        "model_type": "switch_transformers",
        "num_layers": 3,
        "num_decoder_layers": 2,
        "d_model": 8,
        "d_ff": 16,
        "num_heads": 2,
        "d_kv": 4,
        "num_experts": 4,
        "vocab_size": 32,
        "encoder_sparse_step": 1,
        "decoder_sparse_step": 1,
    }
    dims = resolve_dims(switch, config)
    assert dims.stack_starts == (0, 3)
    assert layer_prefix(switch, dims, 0) == "encoder.block.0."
    assert layer_prefix(switch, dims, 4) == "decoder.block.1."
    assert [r.role for r in expert_roles(switch, dims, 4).roles] == ["up", "down"]
    mixtral = next(s for s in FAMILIES if s.name == "mixtral")
    config = {
        "model_type": "mixtral",
        "num_hidden_layers": 2,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "vocab_size": 32,
    }
    assert layer_prefix(mixtral, resolve_dims(mixtral, config), 1) == "model.layers.1."
