"""The README.md model card written beside every model moetool produces.

The card is built with ``huggingface_hub``'s :class:`~huggingface_hub.ModelCard` and
:class:`~huggingface_hub.ModelCardData`, so its YAML metadata is what the Hub reads:

* ``base_model`` holds the Hub repo ids the model came from; a local folder is not a Hub id, so a
  model made from one gets no ``base_model`` (the body says which folder it came from). A folder
  inside the Hugging Face cache (``models--org--name/snapshots/<sha>``) is named by its repo id.
* ``base_model_relation`` is one of the Hub's four relations: ``quantized``, ``merge``, ``finetune``
  (distillation and upcycling: new weights derived from the source) or ``adapter``.
* ``library_name: transformers``, ``pipeline_tag: text-generation`` and ``tags`` (``moe``, ``moetool``,
  what was done).

The body says in plain words what moetool did: the exact command, its options, the source revision
and the versions of moetool, Python, torch, transformers, safetensors and huggingface_hub. Secrets
passed on the command line (``--token`` values, ``hf_...`` tokens) are masked, since cards are meant
to be uploaded.

Every card is checked before it is written (:func:`validate_model_card`). ``ModelCard.validate`` sends
the card to the Hub (``/api/validate-yaml``), which moetool must not need, so the check runs locally:
the card must parse back through ``ModelCard`` into the same metadata, and each field the Hub
validates must have the type and values the Hub accepts. ``validate_model_card(..., online=True)`` also
asks the Hub.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from moetool.errors import MoetoolError

__all__ = [
    "HUB_RELATIONS",
    "README_NAME",
    "CardError",
    "hub_id_of",
    "hub_relation",
    "render_model_card",
    "validate_model_card",
    "write_model_card",
]

README_NAME = "README.md"
# The values the Hub accepts for base_model_relation.
HUB_RELATIONS = frozenset({"adapter", "merge", "quantized", "finetune"})
# What each moetool operation is, in the Hub's terms. Distillation and upcycling make new weights
# from the source's (trained, or copied for further training): the Hub calls such a derivative a
# fine-tune, and would infer "finetune" itself if the relation were left out.
_RELATION_OF = {
    "adapter": "adapter",
    "merge": "merge",
    "quantized": "quantized",
    "quantize": "quantized",
    "finetune": "finetune",
    "distillation": "finetune",
    "distill": "finetune",
    "upcycle": "finetune",
}

_MASK = "***"
_HF_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{16,}")
# "token" but not "tokens": --max-tokens and --calibration-tokens are counts, not secrets.
_SECRET_KEY_RE = re.compile(r"token(?!s\b)|password|secret|api[_-]?key", re.IGNORECASE)
# Characters YAML forbids in a stream or reads as line breaks (NEL, LS, PS); in metadata values
# they would not survive a round trip, so they become spaces.
_YAML_UNSAFE_RE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ufeff\ufffe\uffff\ud800-\udfff]")
# A Hub repo id: "name" or "owner/name".
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9_.-]+)?$")
# A folder of the Hugging Face cache: .../models--<owner>--<name>/snapshots/<revision>
_CACHE_SNAPSHOT_RE = re.compile(r"^models--(?P<repo>.+)$")


class CardError(MoetoolError):
    """A model card whose metadata the Hub would reject (a bug in moetool when it wrote the card)."""

    default_code = "CARD_INVALID"


def _is_repo_id(value: str) -> bool:
    if not (_REPO_ID_RE.match(value) and ".." not in value and not value.endswith((".", "-"))):
        return False
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return len(value) <= 96


def hub_id_of(model: str | os.PathLike[str]) -> str | None:
    """The Hub repo id a model reference names, or ``None`` for a local folder.

    moetool resolves ``MODEL`` as a local path when one exists and as a repo id otherwise; this
    follows the same rule. A Hugging Face cache snapshot folder is named by the repo it caches.

    Args:
        model: what the user passed as ``MODEL`` (a path or a repo id).

    Returns:
        ``"owner/name"`` (or ``"name"``), or ``None`` when ``model`` is a local folder outside the cache.
    """
    text = os.fspath(model)
    path = Path(text).expanduser()
    if path.exists():
        resolved = path.resolve()
        # <cache>/models--owner--name/snapshots/<sha>
        if resolved.parent.name == "snapshots":
            match = _CACHE_SNAPSHOT_RE.match(resolved.parent.parent.name)
            if match:
                repo = match.group("repo").replace("--", "/", 1)
                return repo if _is_repo_id(repo) else None
        return None
    return text if _is_repo_id(text) else None


def hub_relation(relation: str) -> str | None:
    """The Hub's ``base_model_relation`` for a moetool operation (``None`` when none fits)."""
    return _RELATION_OF.get(relation.strip().lower())


def _redact_command(command: str | Sequence[str]) -> str:
    """The command line as one string, with secret option values and Hub tokens masked.

    A string is kept as typed (only masked); a word list is joined with shell quoting.
    """
    if isinstance(command, str):
        text = _SECRET_OPTION_RE.sub(lambda m: f"{m.group(1)}{m.group(2)}{_MASK}", command)
        return _HF_TOKEN_RE.sub(_MASK, text)
    masked: list[str] = []
    mask_next = False
    for word in (str(w) for w in command):
        if mask_next:
            masked.append(_MASK)
            mask_next = False
            continue
        option, sep, _value = word.partition("=")
        if option.startswith("--") and _SECRET_KEY_RE.search(option):
            masked.append(f"{option}={_MASK}" if sep else word)
            mask_next = not sep
            continue
        masked.append(_HF_TOKEN_RE.sub(_MASK, word))
    return shlex.join(masked)


_SECRET_OPTION_RE = re.compile(
    r"(--[\w-]*(?:token(?!s\b)|password|secret|api[_-]?key)[\w-]*)(=|\s+)(\"[^\"]*\"|'[^']*'|\S+)",
    re.IGNORECASE,
)


def _format_value(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, str):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return json.dumps(value, ensure_ascii=False, default=str)


def _cell(value: Any) -> str:
    """One Markdown table cell (or list item): no raw pipes, newlines or HTML."""
    text = _format_value(value)
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = text.replace("\\", "\\\\").replace("|", "\\|")
    return text.replace("\r\n", "\n").replace("\n", "<br>")


def _table(header: tuple[str, str], rows: Mapping[str, Any], *, redact: bool = False) -> list[str]:
    lines = [f"| {header[0]} | {header[1]} |", "| --- | --- |"]
    for key, value in rows.items():
        shown = _MASK if redact and _SECRET_KEY_RE.search(str(key)) and value is not None else value
        if isinstance(shown, str) and redact:
            shown = _HF_TOKEN_RE.sub(_MASK, shown)
        lines.append(f"| {_cell(key)} | {_cell(shown)} |")
    return lines


def _fence(text: str) -> str:
    # A fence longer than any backtick run inside, so the command cannot close the block early.
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def _meta_str(value: str) -> str:
    return _YAML_UNSAFE_RE.sub(" ", value).strip()


def _card_data(hub_ids: Sequence[str], relation: str | None, tags: Sequence[str]) -> Any:
    from huggingface_hub import ModelCardData

    all_tags: list[str] = []
    for tag in ("moe", "moetool", *tags):
        cleaned = _meta_str(str(tag)) if tag else ""
        if cleaned and cleaned not in all_tags:
            all_tags.append(cleaned)
    fields: dict[str, Any] = {}
    if hub_ids:
        fields["base_model"] = hub_ids[0] if len(hub_ids) == 1 else list(hub_ids)
        if relation is not None:
            fields["base_model_relation"] = relation
    return ModelCardData(
        **fields,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=all_tags,
    )


def _source_line(model: str, hub_id: str | None, revision: str | None) -> str:
    if hub_id is None:
        return f"- {_cell(model)}: a local folder (not on the Hub, so no `base_model` in the metadata)"
    where = f"[{hub_id}](https://huggingface.co/{hub_id})"
    if hub_id != model:
        where += f", read from the local cache folder {_cell(model)}"
    if revision:
        where += f" at revision {_cell(revision)}"
    return f"- {where}"


def render_model_card(
    *,
    base_models: Sequence[str],
    relation: str,
    command: str | Sequence[str],
    options: Mapping[str, Any],
    revision: str | None = None,
    tags: Sequence[str] = (),
    summary: str = "",
    results: Mapping[str, Any] | None = None,
) -> str:
    """Render the README.md text for a model moetool wrote.

    Args:
        base_models: the source models as the user named them (Hub ids or local paths). Hub ids (and
            cache folders, by their repo id) go into the ``base_model`` metadata, a list when there
            are several; all of them are listed in the body.
        relation: what moetool did (``merge``, ``quantized``, ``distillation``, ``upcycle``, ...); it is
            written as the Hub's ``base_model_relation`` (see :func:`hub_relation`) when there is a
            ``base_model``.
        command: the exact command line, as one string or as ``sys.argv``-style words.
        options: the effective options, shown as a table (secret-looking keys are masked).
        revision: the source's resolved revision (a full commit sha when it came from the Hub).
        tags: extra tags; ``moe`` and ``moetool`` are always present.
        summary: one paragraph saying what was done; a generic sentence when empty.
        results: optional metrics (name to value), shown as a table.

    Returns:
        The card: YAML front matter between ``---`` lines, then Markdown.
    """
    from huggingface_hub import ModelCard

    from moetool.versions import versions

    sources = [(m, hub_id_of(m)) for m in base_models]
    hub_ids: list[str] = []
    for _model, hub_id in sources:
        if hub_id is not None and hub_id not in hub_ids:
            hub_ids.append(hub_id)
    data = _card_data(hub_ids, hub_relation(relation), tags)

    body: list[str] = ["", "# Model made with moetool", ""]
    named = ", ".join(m for m, _ in sources) or "an unnamed source"
    body.append(summary.strip() or f"This model was produced by moetool ({relation}) from {named}.")
    body += ["", "## Source models", ""]
    body.extend(_source_line(m, hub_id, revision) for m, hub_id in sources)
    if not sources:
        body.append("- (none recorded)")

    command_line = _redact_command(command)
    fence = _fence(command_line)
    body += ["", "## How it was made", "", f"{fence}sh", command_line, fence, ""]
    body += ["### Options", ""]
    body += _table(("option", "value"), options, redact=True) if options else ["(none)"]
    if results:
        body += ["", "## Results", ""]
        body += _table(("metric", "value"), results)
    body += ["", "## Provenance", ""]
    body.append(f"- operation: {_cell(relation)}")
    body.append(f"- source revision: {_cell(revision) if revision else 'not recorded'}")
    for package, version in versions().items():
        body.append(f"- {package}: {_cell(version) if version else 'not installed'}")
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n" + "\n".join(body) + "\n")
    return str(card)


def _problems(text: str) -> list[str]:
    """What the Hub would reject in a card's metadata (empty when none), checked offline."""
    from huggingface_hub import ModelCard

    try:
        card = ModelCard(text)
    except Exception as exc:  # ModelCard raises ValueError/yaml errors on a malformed front matter
        return [f"the metadata does not parse: {exc}"]
    if not text.startswith("---\n"):
        return ["the card has no YAML metadata block"]
    meta = card.data.to_dict()
    problems: list[str] = []
    base = meta.get("base_model")
    bases = base if isinstance(base, list) else [base] if base is not None else []
    if base is not None and (not bases or not all(isinstance(b, str) for b in bases)):
        problems.append("base_model must be a repo id or a list of repo ids")
    problems += [f"base_model {b!r} is not a Hub repo id" for b in bases if isinstance(b, str) and not _is_repo_id(b)]
    relation = meta.get("base_model_relation")
    if relation is not None:
        if relation not in HUB_RELATIONS:
            problems.append(f"base_model_relation {relation!r} is not one of {', '.join(sorted(HUB_RELATIONS))}")
        if not bases:
            problems.append("base_model_relation is set without a base_model")
    for key in ("library_name", "pipeline_tag", "license"):
        if key in meta and not isinstance(meta[key], str):
            problems.append(f"{key} must be a string")
    tags = meta.get("tags")
    if tags is not None and not (isinstance(tags, list) and all(isinstance(t, str) and t for t in tags)):
        problems.append("tags must be a list of non-empty strings")
    # What was written must read back as the same metadata (no YAML surprises).
    if ModelCard(str(card)).data.to_dict() != meta:
        problems.append("the metadata does not survive a round trip through ModelCard")
    return problems


def validate_model_card(card: str | os.PathLike[str], *, online: bool = False) -> None:
    """Check a model card's metadata the way the Hub would, without the network by default.

    Offline, the card must parse through ``huggingface_hub.ModelCard`` and read back unchanged,
    ``base_model`` must be Hub repo ids, ``base_model_relation`` one of the Hub's four values (and only
    beside a ``base_model``), and ``library_name``, ``pipeline_tag``, ``license`` and ``tags`` must have
    the Hub's types. ``online=True`` then calls ``ModelCard.validate``, which posts the card to the Hub.

    Args:
        card: the card's text, or the path of a README.md.
        online: also ask the Hub (needs the network).

    Raises:
        CardError: with every problem found, in one message.
    """
    text = Path(card).read_text(encoding="utf-8") if isinstance(card, os.PathLike) else card
    problems = _problems(text)
    if not problems and online:
        from huggingface_hub import ModelCard

        try:
            ModelCard(text).validate()
        except ValueError as exc:
            problems.append(f"the Hub rejected it: {exc}")
    if problems:
        raise CardError(
            "invalid model card: " + "; ".join(problems),
            hint="this is a bug in moetool; report it with the card",
        )


def write_model_card(folder: Path, **kwargs: Any) -> Path:
    """Render a model card, check it (:func:`validate_model_card`) and write it as ``folder/README.md``.

    Args:
        folder: the (staging) output folder.
        **kwargs: the keyword arguments of :func:`render_model_card`.

    Returns:
        The path written.

    Raises:
        CardError: the rendered card would be rejected by the Hub (nothing is written).
    """
    from moetool.io.writer import write_text

    text = render_model_card(**kwargs)
    validate_model_card(text)
    path = Path(folder) / README_NAME
    write_text(path, text)
    return path
