"""The README.md model card written beside every model moetool produces.

The card records lineage in the Hub's metadata fields (``base_model``, ``base_model_relation``) so the
Hub links the new model to its sources, and says in plain words what moetool did: the exact command,
its options, the moetool version and the source revision. Secrets passed on the command line (``--token``
values, ``hf_...`` tokens) are masked, since cards are meant to be uploaded.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["HUB_RELATIONS", "README_NAME", "render_model_card", "write_model_card"]

README_NAME = "README.md"
# The values the Hub accepts for base_model_relation; anything else ("upcycle", "prune") is omitted
# and the Hub infers the relation itself.
HUB_RELATIONS = frozenset({"adapter", "merge", "quantized", "finetune"})

_MASK = "***"
_HF_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{16,}")
# "token" but not "tokens": --max-tokens and --calibration-tokens are counts, not secrets.
_SECRET_KEY_RE = re.compile(r"token(?!s\b)|password|secret|api[_-]?key", re.IGNORECASE)
# Characters that YAML forbids in a stream, or reads as line breaks inside a quoted scalar even
# though JSON leaves them raw (NEL, LS, PS); they are written as \u escapes instead.
_YAML_UNSAFE_RE = re.compile("[\x7f-\x9f\u2028\u2029\ufeff\ufffe\uffff\ud800-\udfff]")
# A Hub repo id: "name" or "owner/name". Local paths (absolute, relative with ./, ~, or deeper) are
# not valid base_model values and would make the Hub reject the card's metadata.
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9_.-]+)?$")


def _yaml_str(value: str) -> str:
    """A YAML double-quoted scalar: JSON string syntax, plus escapes for what YAML treats specially."""
    text = json.dumps(value, ensure_ascii=False)
    return _YAML_UNSAFE_RE.sub(lambda m: f"\\u{ord(m.group(0)):04x}", text)


def _is_repo_id(value: str) -> bool:
    return bool(_REPO_ID_RE.match(value)) and ".." not in value and not value.endswith((".", "-"))


_SECRET_OPTION_RE = re.compile(
    r"(--[\w-]*(?:token(?!s\b)|password|secret|api[_-]?key)[\w-]*)(=|\s+)(\"[^\"]*\"|'[^']*'|\S+)",
    re.IGNORECASE,
)


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
    """One Markdown table cell: no raw pipes, newlines or HTML."""
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
        base_models: the source models (Hub ids or local paths). Hub ids go into the ``base_model``
            metadata (a list when there are several); all of them are listed in the body.
        relation: what moetool did (``merge``, ``quantized``, ``finetune``, ``adapter``, ``upcycle``,
            ...). Only the Hub's own relation names are written as ``base_model_relation``.
        command: the exact command line, as one string or as ``sys.argv``-style words.
        options: the effective options, shown as a table (secret-looking keys are masked).
        revision: the source's resolved revision (a full commit sha when it came from the Hub).
        tags: extra tags; ``moe`` and ``moetool`` are always present.
        summary: one paragraph saying what was done; a generic sentence when empty.
        results: optional metrics (name to value), shown as a table.

    Returns:
        The card: YAML front matter between ``---`` lines, then Markdown.
    """
    from moetool import __version__

    hub_ids = [m for m in base_models if _is_repo_id(m)]
    all_tags: list[str] = []
    for tag in ("moe", "moetool", *tags):
        if tag and tag not in all_tags:
            all_tags.append(tag)

    front: list[str] = ["---"]
    if len(hub_ids) == 1:
        front.append(f"base_model: {_yaml_str(hub_ids[0])}")
    elif hub_ids:
        front.append("base_model:")
        front.extend(f"- {_yaml_str(m)}" for m in hub_ids)
    if hub_ids and relation in HUB_RELATIONS:
        front.append(f"base_model_relation: {_yaml_str(relation)}")
    front.append(f"library_name: {_yaml_str('transformers')}")
    front.append(f"pipeline_tag: {_yaml_str('text-generation')}")
    front.append("tags:")
    front.extend(f"- {_yaml_str(t)}" for t in all_tags)
    front.append("---")

    sources = ", ".join(base_models) or "an unnamed source"
    body: list[str] = ["", "# Model made with moetool", ""]
    body.append(summary.strip() or f"This model was produced by moetool ({relation}) from {sources}.")
    body += ["", "## Source models", ""]
    body.extend(f"- {_cell(m)}" for m in base_models)
    if not base_models:
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
    body.append(f"- moetool version: {__version__}")
    body.append(f"- relation: {_cell(relation)}")
    body.append(f"- source revision: {_cell(revision) if revision else 'not recorded'}")
    return "\n".join(front + body) + "\n"


def write_model_card(folder: Path, **kwargs: Any) -> Path:
    """Render a model card and write it as ``folder/README.md``.

    Args:
        folder: the (staging) output folder.
        **kwargs: the keyword arguments of :func:`render_model_card`.

    Returns:
        The path written.
    """
    from moetool.io.writer import write_text

    path = Path(folder) / README_NAME
    write_text(path, render_model_card(**kwargs))
    return path
