"""Build the small multi-domain text corpus used to train the example MoE.

The corpus is made only from text that ships with every CPython installation, so it can be
rebuilt offline, without extra packages, and reproduces byte for byte on the same Python
version. It has three clearly different domains:

* ``code``: chunks of Python standard library source files.
* ``prose``: English documentation, namely the language reference topics of
  ``pydoc_data.topics`` plus docstrings of standard library modules, classes and functions.
* ``data``: structured records (CSV, TSV, JSON, JSON Lines, INI, XML) rendered from standard
  library tables such as ``unicodedata``, ``html.entities``, ``encodings.aliases``,
  ``http.HTTPStatus`` and from seeded synthetic measurements.

Standard library files are split in two halves by a hash of their path: one half feeds
``code`` and the other half feeds the docstrings of ``prose``, so no docstring is in both
domains. Train and heldout are split by document group (a source file, a documentation
topic, a data document), so heldout text never shares a file with train text.

Usage::

    python examples/build_corpus.py            # writes examples/data/{train,heldout}.jsonl
    python examples/build_corpus.py --out DIR --seed 0
"""

from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import datetime
import dis
import encodings.aliases
import hashlib
import html.entities
import http
import io
import json
import locale
import mimetypes
import platform
import random
import sys
import sysconfig
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

DOMAINS = ("code", "prose", "data")
DEFAULT_OUT = Path(__file__).resolve().parent / "data"

# Folders that are generated tables, test suites, or split into separate packages by Linux
# distributions; leaving them out keeps the corpus "real" source and the same across installs.
EXCLUDED_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "tkinter",
        "turtledemo",
        "encodings",
        "pydoc_data",
        "__phello__",
        "__pycache__",
    }
)
# Files larger than this are mostly generated or vendored; they would dominate the sample.
MAX_SOURCE_BYTES = 160_000
MIN_DOC_CHARS = 200
MIN_DOCSTRING_CHARS = 120
# Cap per source file, so that the sample spreads over many files instead of a few long ones.
MAX_DOCS_PER_GROUP = 4


@dataclasses.dataclass(frozen=True)
class Document:
    """One corpus document.

    Attributes:
        text: The document text, at most ``max_chars`` characters.
        domain: One of :data:`DOMAINS`.
        group: Documents of one group (a file, a topic) always land in the same split.
    """

    text: str
    domain: str
    group: str


# --------------------------------------------------------------------------------------------
# Text chunking
# --------------------------------------------------------------------------------------------


def _split_long_block(block: str, max_chars: int) -> Iterator[str]:
    """Split one block that is longer than ``max_chars`` at line boundaries.

    Args:
        block: Text without blank lines, possibly longer than ``max_chars``.
        max_chars: Maximum length of each piece.

    Yields:
        Pieces of at most ``max_chars`` characters; single overlong lines are truncated.
    """
    piece: list[str] = []
    size = 0
    for line in block.split("\n"):
        line = line[:max_chars]
        if piece and size + len(line) + 1 > max_chars:
            yield "\n".join(piece)
            piece, size = [], 0
        piece.append(line)
        size += len(line) + 1
    if piece:
        yield "\n".join(piece)


def pack_paragraphs(text: str, max_chars: int) -> list[str]:
    """Pack blank-line separated paragraphs greedily into chunks of at most ``max_chars``.

    Cutting at paragraph (or, for code, block) boundaries keeps chunks readable instead of
    slicing through the middle of a sentence or statement.

    Args:
        text: Text to chunk; line endings must already be ``\\n``.
        max_chars: Maximum length of a chunk.

    Returns:
        The chunks, in order, with surrounding whitespace stripped.
    """
    blocks: list[str] = []
    for paragraph in text.split("\n\n"):
        paragraph = paragraph.strip("\n")
        if paragraph.strip():
            blocks.extend(_split_long_block(paragraph, max_chars))
    chunks: list[str] = []
    current = ""
    for block in blocks:
        candidate = f"{current}\n\n{block}" if current else block
        if len(candidate) <= max_chars:
            current = candidate
        else:
            chunks.append(current)
            current = block
    if current:
        chunks.append(current)
    return [chunk.strip() for chunk in chunks if chunk.strip()]


def stable_half(key: str) -> int:
    """Return 0 or 1 from a hash of ``key``, independent of ``PYTHONHASHSEED``."""
    return hashlib.sha256(key.encode("utf-8")).digest()[0] % 2


# --------------------------------------------------------------------------------------------
# Standard library sources (code and docstrings)
# --------------------------------------------------------------------------------------------


def stdlib_sources() -> list[tuple[str, str]]:
    """List the standard library ``.py`` files used for the code and prose domains.

    Returns:
        Sorted ``(relative_path, source_text)`` pairs with ``\\n`` line endings.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    sources = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in EXCLUDED_DIRS for part in rel.parts[:-1]):
            continue
        # _sysconfigdata* describes the build machine, so it differs between installs.
        if rel.name.startswith("_sysconfigdata") or path.stat().st_size > MAX_SOURCE_BYTES:
            continue
        text = path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")
        sources.append((rel.as_posix(), text))
    return sources


def code_documents(sources: list[tuple[str, str]], max_chars: int) -> list[Document]:
    """Cut the code half of the standard library into code documents.

    Args:
        sources: ``(relative_path, text)`` pairs from :func:`stdlib_sources`.
        max_chars: Maximum document length.

    Returns:
        Documents grouped by source file.
    """
    docs = []
    for rel, text in sources:
        if stable_half(rel) != 0:
            continue
        for chunk in pack_paragraphs(text, max_chars):
            if len(chunk) >= MIN_DOC_CHARS:
                docs.append(Document(chunk, "code", f"code:{rel}"))
    return docs


def _docstrings(tree: ast.Module) -> Iterator[str]:
    """Yield the module, class and function docstrings of a parsed module in source order."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= MIN_DOCSTRING_CHARS:
                yield doc


def docstring_documents(sources: list[tuple[str, str]], max_chars: int) -> list[Document]:
    """Collect the docstrings of the prose half of the standard library as prose documents.

    Args:
        sources: ``(relative_path, text)`` pairs from :func:`stdlib_sources`.
        max_chars: Maximum document length.

    Returns:
        Documents grouped by source file; docstrings of one file are packed together.
    """
    docs = []
    for rel, text in sources:
        if stable_half(rel) != 1:
            continue
        try:
            tree = ast.parse(text)
        except SyntaxError:  # a few files are templates or target other Python versions
            continue
        joined = "\n\n".join(_docstrings(tree))
        for chunk in pack_paragraphs(joined, max_chars):
            if len(chunk) >= MIN_DOC_CHARS:
                docs.append(Document(chunk, "prose", f"docstring:{rel}"))
    return docs


def topic_documents(max_chars: int) -> list[Document]:
    """Cut the language reference topics that back ``help()`` into prose documents.

    Args:
        max_chars: Maximum document length.

    Returns:
        Documents grouped by topic.
    """
    from pydoc_data.topics import topics

    docs = []
    for name in sorted(topics):
        for chunk in pack_paragraphs(topics[name].replace("\r\n", "\n"), max_chars):
            if len(chunk) >= MIN_DOC_CHARS:
                docs.append(Document(chunk, "prose", f"topic:{name}"))
    return docs


# --------------------------------------------------------------------------------------------
# Structured data tables
# --------------------------------------------------------------------------------------------

Row = dict[str, object]


def unicode_table() -> list[Row]:
    """Unicode character properties, skipping the huge runs of numbered ideograph names."""
    rows: list[Row] = []
    for cp in range(0x20, 0x30000):
        char = chr(cp)
        name = unicodedata.name(char, "")
        if not name or "IDEOGRAPH" in name or name.startswith("HANGUL SYLLABLE"):
            continue
        category = unicodedata.category(char)
        rows.append(
            {
                "code": f"U+{cp:04X}",
                "name": name,
                "category": category,
                "bidi": unicodedata.bidirectional(char),
                "width": unicodedata.east_asian_width(char),
                "mirrored": bool(unicodedata.mirrored(char)),
                "numeric": unicodedata.numeric(char, None),
                # Only graphic characters: controls and marks would make odd or invalid XML.
                "char": char if category[0] in "LNPS" else "",
            }
        )
    return rows


def entity_table() -> list[Row]:
    """HTML5 named character references."""
    return [
        {
            "entity": name,
            "codepoints": " ".join(f"U+{ord(c):04X}" for c in value),
            "text": value if value.isprintable() else "",
        }
        for name, value in sorted(html.entities.html5.items())
    ]


def encoding_alias_table() -> list[Row]:
    """Codec alias names."""
    return [{"alias": a, "codec": c} for a, c in sorted(encodings.aliases.aliases.items())]


def locale_alias_table() -> list[Row]:
    """Locale alias names (the table is built into ``locale``, not read from the system)."""
    return [{"alias": a, "locale": loc} for a, loc in sorted(locale.locale_alias.items())]


def http_status_table() -> list[Row]:
    """HTTP status codes with their phrases and descriptions."""
    return [{"code": s.value, "phrase": s.phrase, "description": s.description} for s in http.HTTPStatus]


def mime_table() -> list[Row]:
    """Default MIME types; a fresh ``MimeTypes()`` ignores the system's mime.types files."""
    types = mimetypes.MimeTypes().types_map[True]
    return [{"extension": ext, "type": mtype} for ext, mtype in sorted(types.items())]


def opcode_table() -> list[Row]:
    """Bytecode instruction names of this interpreter."""
    return [
        {"opname": name, "opcode": code, "has_arg": code >= dis.HAVE_ARGUMENT}
        for name, code in sorted(dis.opmap.items(), key=lambda item: item[1])
    ]


def api_index_table(sources: list[tuple[str, str]]) -> list[Row]:
    """An index of standard library functions and classes (module, name, line, arguments)."""
    rows: list[Row] = []
    for rel, text in sources:
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        module = rel.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                is_class = isinstance(node, ast.ClassDef)
                rows.append(
                    {
                        "module": module,
                        "name": node.name,
                        "kind": "class" if is_class else "function",
                        "line": node.lineno,
                        "args": 0 if is_class else len(node.args.args) + len(node.args.kwonlyargs),
                        "documented": ast.get_docstring(node) is not None,
                    }
                )
    return rows


def weather_table(seed: int) -> list[Row]:
    """Synthetic daily weather readings from a seeded generator."""
    rng = random.Random(seed)
    start = datetime.date(2021, 1, 1)
    rows: list[Row] = []
    for station in range(1, 41):
        base = rng.uniform(-5.0, 25.0)
        for day in range(0, 365, 3):
            rows.append(
                {
                    "station": f"ST{station:03d}",
                    "date": (start + datetime.timedelta(days=day)).isoformat(),
                    "temp_c": round(base + rng.gauss(0.0, 6.0), 1),
                    "humidity": rng.randint(15, 100),
                    "wind_kph": round(abs(rng.gauss(12.0, 8.0)), 1),
                    "rain_mm": round(max(0.0, rng.gauss(-1.0, 4.0)), 1),
                }
            )
    return rows


def orders_table(seed: int) -> list[Row]:
    """Synthetic shop orders from a seeded generator."""
    rng = random.Random(seed + 1)
    statuses = ("paid", "shipped", "delivered", "refunded", "pending")
    currencies = ("EUR", "USD", "GBP", "JPY")
    start = datetime.datetime(2022, 3, 1, 8, 0, 0)
    rows: list[Row] = []
    for order in range(1, 6001):
        rows.append(
            {
                "order_id": 100000 + order,
                "customer": f"C{rng.randint(1, 900):04d}",
                "sku": f"{rng.choice('ABCDEFGH')}{rng.randint(100, 999)}-{rng.choice('SMLX')}",
                "qty": rng.randint(1, 12),
                "unit_price": round(rng.lognormvariate(3.0, 0.8), 2),
                "currency": rng.choice(currencies),
                "status": rng.choice(statuses),
                "created": (start + datetime.timedelta(minutes=17 * order)).isoformat(),
            }
        )
    return rows


# --------------------------------------------------------------------------------------------
# Record renderers
# --------------------------------------------------------------------------------------------


def _cell(value: object) -> str:
    """Render a value for the text-based formats (CSV, TSV, INI, XML)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def render_csv(name: str, rows: list[Row], delimiter: str = ",") -> str:
    """Render rows as CSV (or TSV) with a header line."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=delimiter, lineterminator="\n")
    writer.writerow(list(rows[0]))
    writer.writerows([_cell(v) for v in row.values()] for row in rows)
    return buffer.getvalue()


def render_tsv(name: str, rows: list[Row]) -> str:
    """Render rows as tab separated values with a header line."""
    return render_csv(name, rows, delimiter="\t")


def render_json(name: str, rows: list[Row]) -> str:
    """Render rows as a pretty printed JSON object holding a list of records."""
    return json.dumps({"table": name, "records": rows}, indent=2, ensure_ascii=False)


def render_jsonl(name: str, rows: list[Row]) -> str:
    """Render rows as JSON Lines."""
    return "\n".join(json.dumps(row, ensure_ascii=False) for row in rows)


def render_ini(name: str, rows: list[Row]) -> str:
    """Render rows as INI sections keyed by the first column."""
    first = next(iter(rows[0]))
    parts = []
    for row in rows:
        lines = [f"[{name}.{_cell(row[first])}]"]
        lines += [f"{key} = {_cell(value)}" for key, value in row.items() if key != first]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def render_xml(name: str, rows: list[Row]) -> str:
    """Render rows as an XML document with one element per record."""
    lines = ['<?xml version="1.0" encoding="utf-8"?>', f"<table name={quoteattr(name)}>"]
    for row in rows:
        lines.append("  <record>")
        lines += [f"    <{key}>{escape(_cell(value))}</{key}>" for key, value in row.items()]
        lines.append("  </record>")
    lines.append("</table>")
    return "\n".join(lines)


RENDERERS: dict[str, Callable[[str, list[Row]], str]] = {
    "csv": render_csv,
    "tsv": render_tsv,
    "json": render_json,
    "jsonl": render_jsonl,
    "ini": render_ini,
    "xml": render_xml,
}


def table_documents(name: str, rows: list[Row], rng: random.Random, max_chars: int) -> list[Document]:
    """Cut a table into runs of consecutive rows, each rendered in a randomly chosen format.

    Args:
        name: Table name, used in some formats and in the document group.
        rows: The table's records; all rows share the same keys.
        rng: Seeded generator choosing run lengths and formats.
        max_chars: Maximum document length; runs are shortened until they fit.

    Returns:
        One document per run of rows; each document is its own group.
    """
    docs = []
    start = 0
    while start < len(rows):
        fmt = rng.choice(sorted(RENDERERS))
        count = rng.randint(4, 40)
        # Drop rows from the end until the rendering fits, so every document stays well formed.
        while True:
            text = RENDERERS[fmt](name, rows[start : start + count])
            if len(text) <= max_chars or count == 1:
                break
            count = max(1, count * 3 // 4)
        if MIN_DOC_CHARS <= len(text) <= max_chars:
            docs.append(Document(text, "data", f"data:{name}:{start}"))
        start += count
    return docs


def data_documents(sources: list[tuple[str, str]], seed: int, max_chars: int, budget: int) -> list[Document]:
    """Render all tables and take documents round robin across tables up to ``budget`` chars.

    Round robin keeps the big tables (Unicode names, the API index) from crowding out the
    small ones, so the domain mixes many kinds of records and all six formats.

    Args:
        sources: Standard library sources, for the API index table.
        seed: Seed for the synthetic tables and the format choices.
        max_chars: Maximum document length.
        budget: Total characters to collect.

    Returns:
        The selected data documents.
    """
    rng = random.Random(seed)
    tables = {
        "unicode": unicode_table(),
        "html_entities": entity_table(),
        "encoding_aliases": encoding_alias_table(),
        "locale_aliases": locale_alias_table(),
        "http_status": http_status_table(),
        "mime_types": mime_table(),
        "opcodes": opcode_table(),
        "stdlib_api": api_index_table(sources),
        "weather": weather_table(seed),
        "orders": orders_table(seed),
    }
    queues = []
    for name, rows in tables.items():
        docs = table_documents(name, rows, rng, max_chars)
        rng.shuffle(docs)
        queues.append(docs)
    return take_round_robin(queues, budget)


# --------------------------------------------------------------------------------------------
# Selection, split and output
# --------------------------------------------------------------------------------------------


def take_round_robin(queues: list[list[Document]], budget: int) -> list[Document]:
    """Take one document from each queue in turn until ``budget`` characters are collected.

    Args:
        queues: Document lists; each is consumed from the front.
        budget: Total characters to collect.

    Returns:
        The taken documents.
    """
    taken: list[Document] = []
    total = 0
    positions = [0] * len(queues)
    while total < budget and any(p < len(q) for p, q in zip(positions, queues, strict=True)):
        for i, queue in enumerate(queues):
            if positions[i] < len(queue) and total < budget:
                taken.append(queue[positions[i]])
                total += len(queue[positions[i]].text)
                positions[i] += 1
    return taken


def take_by_group(docs: list[Document], rng: random.Random, budget: int) -> list[Document]:
    """Take up to ``MAX_DOCS_PER_GROUP`` documents per group, round robin over shuffled groups.

    Args:
        docs: Candidate documents.
        rng: Seeded generator shuffling groups and picking documents inside a group.
        budget: Total characters to collect.

    Returns:
        The taken documents, in the order taken.
    """
    by_group: dict[str, list[Document]] = {}
    for doc in docs:
        by_group.setdefault(doc.group, []).append(doc)
    groups = sorted(by_group)
    rng.shuffle(groups)
    rounds: list[list[Document]] = [[] for _ in range(MAX_DOCS_PER_GROUP)]
    for group in groups:
        members = by_group[group]
        picked = sorted(rng.sample(range(len(members)), min(MAX_DOCS_PER_GROUP, len(members))))
        for round_docs, index in zip(rounds, picked, strict=False):
            round_docs.append(members[index])
    # Every group gives its first pick before any group gives a second one, and so on.
    return take_round_robin([[doc for round_docs in rounds for doc in round_docs]], budget)


def split_by_group(
    docs: list[Document], rng: random.Random, heldout_fraction: float
) -> tuple[list[Document], list[Document]]:
    """Split documents into train and heldout so that no group is in both.

    Args:
        docs: Documents of one domain.
        rng: Seeded generator ordering the groups.
        heldout_fraction: Target share of characters in heldout.

    Returns:
        ``(train, heldout)``.
    """
    group_chars: dict[str, int] = {}
    for doc in docs:
        group_chars[doc.group] = group_chars.get(doc.group, 0) + len(doc.text)
    groups = sorted(group_chars)
    rng.shuffle(groups)
    target = heldout_fraction * sum(group_chars.values())
    heldout_groups: set[str] = set()
    size = 0
    for group in groups:
        if size >= target:
            break
        # Skip a big group (a long documentation topic) that would overshoot the target.
        if size + group_chars[group] <= 1.2 * target:
            heldout_groups.add(group)
            size += group_chars[group]
    train = [doc for doc in docs if doc.group not in heldout_groups]
    heldout = [doc for doc in docs if doc.group in heldout_groups]
    return train, heldout


def build(seed: int, chars_per_domain: int, max_chars: int) -> dict[str, list[Document]]:
    """Build every domain's documents.

    Args:
        seed: Seed for all random choices.
        chars_per_domain: Characters to collect per domain (train and heldout together).
        max_chars: Maximum document length.

    Returns:
        Documents per domain.
    """
    rng = random.Random(seed)
    sources = stdlib_sources()
    code = take_by_group(code_documents(sources, max_chars), rng, chars_per_domain)
    # All topics first: they are the most prose-like text available; docstrings fill up.
    topics = topic_documents(max_chars)
    topic_chars = sum(len(doc.text) for doc in topics)
    docstrings = take_by_group(docstring_documents(sources, max_chars), rng, max(0, chars_per_domain - topic_chars))
    data = data_documents(sources, seed, max_chars, chars_per_domain)
    return {"code": code, "prose": topics + docstrings, "data": data}


def write_jsonl(path: Path, docs: Iterable[Document]) -> None:
    """Write documents as JSON Lines with ``text`` and ``domain`` fields."""
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for doc in docs:
            handle.write(json.dumps({"text": doc.text, "domain": doc.domain}, ensure_ascii=False) + "\n")


def sha256_file(path: Path) -> str:
    """Return the hex SHA-256 digest of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def split_stats(docs: list[Document]) -> dict[str, dict[str, int]]:
    """Count documents, characters and UTF-8 bytes per domain."""
    stats = {}
    for domain in DOMAINS:
        texts = [doc.text for doc in docs if doc.domain == domain]
        stats[domain] = {
            "documents": len(texts),
            "chars": sum(map(len, texts)),
            "bytes": sum(len(t.encode("utf-8")) for t in texts),
        }
    return stats


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed for all random choices")
    parser.add_argument("--chars-per-domain", type=int, default=950_000, help="characters per domain, both splits")
    parser.add_argument("--max-doc-chars", type=int, default=2000, help="maximum document length")
    parser.add_argument("--heldout-fraction", type=float, default=0.05, help="share held out")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Build the corpus and write train.jsonl, heldout.jsonl and MANIFEST.json."""
    args = parse_args(argv)
    rng = random.Random(args.seed)
    per_domain = build(args.seed, args.chars_per_domain, args.max_doc_chars)
    train: list[Document] = []
    heldout: list[Document] = []
    for domain in DOMAINS:
        domain_train, domain_heldout = split_by_group(per_domain[domain], rng, args.heldout_fraction)
        train += domain_train
        heldout += domain_heldout
    # Interleave domains so any prefix of a file is a fair sample of the corpus.
    rng.shuffle(train)
    rng.shuffle(heldout)

    args.out.mkdir(parents=True, exist_ok=True)
    files = {"train": args.out / "train.jsonl", "heldout": args.out / "heldout.jsonl"}
    write_jsonl(files["train"], train)
    write_jsonl(files["heldout"], heldout)
    manifest = {
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "unicode_version": unicodedata.unidata_version,
        "seed": args.seed,
        "chars_per_domain": args.chars_per_domain,
        "max_doc_chars": args.max_doc_chars,
        "heldout_fraction": args.heldout_fraction,
        "splits": {"train": split_stats(train), "heldout": split_stats(heldout)},
        "sha256": {f"{name}.jsonl": sha256_file(path) for name, path in files.items()},
    }
    (args.out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    for name, docs in (("train", train), ("heldout", heldout)):
        stats = split_stats(docs)
        summary = ", ".join(f"{d}={s['documents']} docs/{s['bytes']} B" for d, s in stats.items())
        print(f"{name}: {summary}", file=sys.stderr)


if __name__ == "__main__":
    main()
