"""Model cards: Hub lineage metadata through huggingface_hub's ModelCard, validated offline."""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from moetool.io.model_card import CardError, hub_id_of, hub_relation, render_model_card, validate_model_card
from moetool.versions import versions


def card(**kwargs) -> ModelCard:
    defaults = {"relation": "quantized", "command": ["moetool", "quantize", "x"], "options": {"bits": 4}}
    return ModelCard(render_model_card(**{**defaults, **kwargs}))


def test_hub_input_gets_base_model_and_relation() -> None:
    made = card(base_models=["mistralai/Mixtral-8x7B-v0.1"], revision="a" * 40)
    data = made.data.to_dict()
    assert data["base_model"] == "mistralai/Mixtral-8x7B-v0.1"
    assert data["base_model_relation"] == "quantized"
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert data["tags"][:2] == ["moe", "moetool"]
    assert "https://huggingface.co/mistralai/Mixtral-8x7B-v0.1" in made.text and "a" * 40 in made.text
    validate_model_card(str(made))


def test_local_input_gets_no_base_model_and_says_where_it_came_from(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples" / "tiny-moe").mkdir(parents=True)
    made = card(base_models=["examples/tiny-moe"], relation="distillation")
    data = made.data.to_dict()
    # "examples/tiny-moe" has the shape of a repo id, but it is the local folder moetool read.
    assert "base_model" not in data and "base_model_relation" not in data
    assert "examples/tiny-moe: a local folder" in made.text
    validate_model_card(str(made))


def test_cache_snapshot_is_named_by_its_repo_id(tmp_path: Path) -> None:
    snapshot = tmp_path / "hub" / "models--Qwen--Qwen1.5-MoE-A2.7B" / "snapshots" / ("b" * 40)
    snapshot.mkdir(parents=True)
    assert hub_id_of(snapshot) == "Qwen/Qwen1.5-MoE-A2.7B"
    made = card(base_models=[str(snapshot)], relation="merge")
    assert made.data.to_dict()["base_model"] == "Qwen/Qwen1.5-MoE-A2.7B"
    assert made.data.to_dict()["base_model_relation"] == "merge"
    assert hub_id_of(tmp_path) is None
    assert hub_id_of("not a repo") is None and hub_id_of("org/name") == "org/name"


@pytest.mark.parametrize(
    ("operation", "relation"),
    [("quantized", "quantized"), ("merge", "merge"), ("distillation", "finetune"), ("upcycle", "finetune"),
     ("adapter", "adapter"), ("mystery", None)],
)  # fmt: skip
def test_relations(operation: str, relation: str | None) -> None:
    assert hub_relation(operation) == relation
    data = card(base_models=["org/model"], relation=operation).data.to_dict()
    assert data.get("base_model_relation") == relation


def test_versions_and_exact_command_are_recorded() -> None:
    command = ["moetool", "distill", "org/teacher", "-o", "my student", "--token", "hf_" + "a" * 30]
    made = card(base_models=["org/teacher"], relation="distillation", command=command)
    assert "moetool distill org/teacher -o 'my student' --token '***'" in made.text
    for package, version in versions().items():
        if version:
            assert f"- {package}: {version}" in made.text
    assert "hf_aaaa" not in made.text


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("---\nbase_model: ./local/path\n---\n", "not a Hub repo id"),
        ("---\nbase_model: org/a\nbase_model_relation: upcycle\n---\n", "base_model_relation"),
        ("---\nbase_model_relation: merge\n---\n", "without a base_model"),
        ("---\ntags: [1, 2]\n---\n", "tags"),
        ("---\n- a list\n---\n", "does not parse"),
        ("# no metadata\n", "no YAML metadata"),
    ],
)
def test_validation_rejects_what_the_hub_would(text: str, needle: str) -> None:
    with pytest.raises(CardError) as info:
        validate_model_card(text)
    assert needle in info.value.message and info.value.code == "CARD_INVALID"


def test_validate_reads_a_readme(tmp_path: Path) -> None:
    path = tmp_path / "README.md"
    path.write_text(render_model_card(base_models=[], relation="merge", command="moetool merge", options={}))
    validate_model_card(path)


@pytest.mark.network
def test_the_hub_accepts_the_card() -> None:
    """The online check (ModelCard.validate posts to the Hub); deselected by default."""
    validate_model_card(
        render_model_card(base_models=["mistralai/Mixtral-8x7B-v0.1"], relation="quantized", command="x", options={}),
        online=True,
    )
