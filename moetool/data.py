"""Text datasets for the commands that run a model: documents, fixed-length token windows, batches.

``--dataset`` is a local file, a local folder or a Hugging Face Hub dataset id:

- ``.txt``: one document per paragraph; paragraphs are separated by one or more blank lines
  (whitespace-only lines count as blank), and the line breaks inside a paragraph are kept.
- ``.jsonl`` / ``.ndjson``: one JSON object per line (blank lines are skipped).
- ``.json``: a list of objects, or an object holding that list under ``"data"`` or ``"rows"``.
- ``.csv`` / ``.tsv``: a header row, then one record per row.
- ``.parquet``: read with pyarrow (optional: ``pip install pyarrow``), one row group at a time.
- ``.txt.gz``, ``.jsonl.gz``, ``.json.gz``, ``.csv.gz``, ``.tsv.gz``: the same, gzip-compressed.
- A folder: every supported file below it, recursively, in sorted path order; hidden files and
  folders (``.name``) and files of other types (a README.md) are skipped. A folder written by
  ``datasets``' ``save_to_disk`` is read with ``datasets.load_from_disk`` instead.
- Anything else is a Hub dataset id (or a ``datasets`` builder name such as ``json`` with
  ``data_files``), loaded with ``datasets.load_dataset`` (optional: ``pip install datasets``), whose
  own cache and offline mode (``HF_DATASETS_OFFLINE`` / ``HF_HUB_OFFLINE``) apply.

A JSON record may also be a bare string, taken as the document's text. Text values must be strings
(``null`` counts as empty text); any other type is refused, because ``str()`` of a list or a number
is not text a model was meant to read. Domain values are converted with ``str()``. Files are read as
UTF-8 (a byte-order mark is ignored).

Everything is validated when :func:`load_documents` runs, before any model is loaded: a malformed
line is reported as ``file:line``, a missing field with the fields that are present.

Nothing here imports torch at module level; :func:`iter_batches` imports it when called.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moetool.errors import DatasetError, MissingDependencyError, UsageError

if TYPE_CHECKING:
    import torch

#: Local file types, by (lower-case) suffix. ``.gz`` may follow any text format.
TEXT_FORMATS: dict[str, str] = {
    ".txt": "txt",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
}
SUPPORTED_SUFFIXES: tuple[str, ...] = (*TEXT_FORMATS, ".parquet", *(f"{s}.gz" for s in TEXT_FORMATS))

# Keys under which a .json file may hold its list of records ({"data": [...]}, {"rows": [...]}).
_JSON_LIST_KEYS = ("data", "rows")
# How many field names an error message lists.
_FIELDS_SHOWN = 12
# Rows fetched per pyarrow / datasets batch: bounded memory without per-row overhead.
_ROW_BATCH = 1024

HINT_TEXT_FIELD = "pass --text-field with the name of the column that holds the text"
HINT_DOMAIN_FIELD = "pass --domain-field with the name of a column present in every record, or leave it out"


@dataclass(frozen=True)
class Document:
    """One text of a dataset.

    Attributes:
        text: the text, never empty.
        domain: the value of the domain field as a string; ``None`` when no domain field was asked for.
    """

    text: str
    domain: str | None = None


@dataclass(frozen=True)
class Window:
    """A run of consecutive tokens from documents of one domain.

    Attributes:
        input_ids: the token ids, at most ``seq_len`` of them.
        domain: the domain of every document the tokens come from.
    """

    input_ids: list[int]
    domain: str | None


@dataclass(frozen=True)
class Batch:
    """Windows stacked into tensors, right-padded to the longest window of the batch.

    Attributes:
        input_ids: ``[B, T]`` token ids, padding positions hold the pad id.
        attention_mask: ``[B, T]``, 1 for real tokens, 0 for padding.
        domains: the domain of each row.
    """

    input_ids: torch.LongTensor
    attention_mask: torch.LongTensor
    domains: list[str | None]


# ----------------------------------------------------------------------------- documents


def load_documents(
    spec: str,
    *,
    text_field: str = "text",
    domain_field: str | None = None,
    split: str = "train",
    data_files: str | list[str] | None = None,
    config_name: str | None = None,
) -> list[Document]:
    """Read and validate every document of a dataset (see the module docstring for the formats).

    Documents whose text is empty or whitespace-only are skipped.

    Args:
        spec: a local file or folder, or a Hub dataset id.
        text_field: the field (column) that holds the text; ignored for ``.txt`` files.
        domain_field: a field whose value names each document's domain (for per-domain figures).
        split: the split of a Hub dataset (or of a ``save_to_disk`` folder holding several).
        data_files: for a Hub dataset, passed to ``datasets.load_dataset``; for a local folder, glob
            patterns relative to it that choose the files to read.
        config_name: the configuration of a Hub dataset that has several (``wikitext-2-raw-v1``).

    Returns:
        The documents, in file (or dataset) order.

    Raises:
        DatasetError: ``DATASET_NOT_FOUND``, ``DATASET_FORMAT`` (unknown file type, malformed JSON or
            CSV, not UTF-8), ``DATASET_COLUMN`` (the text or domain field is missing, or the text is
            not a string), ``DATASET_EMPTY`` (no non-empty text at all), ``DATASET_SPLIT``.
        MissingDependencyError: a Parquet file without pyarrow, a Hub dataset without datasets.
        UsageError: ``data_files`` with a single local file.
    """
    if not spec:
        raise UsageError("--dataset is empty", hint="pass a local file or folder, or a Hub dataset id")
    if not text_field:
        raise UsageError("--text-field is empty", hint=HINT_TEXT_FIELD)
    if domain_field == "":
        raise UsageError("--domain-field is empty", hint=HINT_DOMAIN_FIELD)
    documents = list(
        iter_documents(
            spec,
            text_field=text_field,
            domain_field=domain_field,
            split=split,
            data_files=data_files,
            config_name=config_name,
        )
    )
    if not documents:
        raise DatasetError(
            f"{spec} has no non-empty text" + ("" if _is_plain_text(spec) else f" in field {text_field!r}"),
            hint="check that the file is the one you meant and that its text field is filled",
            code="DATASET_EMPTY",
        )
    return documents


def iter_documents(
    spec: str,
    *,
    text_field: str = "text",
    domain_field: str | None = None,
    split: str = "train",
    data_files: str | list[str] | None = None,
    config_name: str | None = None,
) -> Iterator[Document]:
    """Yield the documents of a dataset one at a time, validating as it goes.

    The lazy form of :func:`load_documents` (same arguments and errors, except that an empty dataset
    yields nothing instead of raising): a malformed line far into a file is found only when it is
    reached.
    """
    path = Path(spec).expanduser()
    patterns = [data_files] if isinstance(data_files, str) else list(data_files or [])
    if path.is_file():
        _refuse_split(split, spec, "a local file")
        if patterns:
            raise UsageError(
                f"--data-files cannot be used with the file {spec}",
                hint="--data-files chooses files inside a folder or a Hub dataset; pass the file alone",
            )
        yield from _read_file(path, shown=spec, text_field=text_field, domain_field=domain_field)
    elif path.is_dir():
        yield from _read_folder(path, spec, text_field, domain_field, split=split, patterns=patterns)
    elif path.exists():
        raise DatasetError(f"{spec} is neither a file nor a folder", code="DATASET_NOT_FOUND")
    elif _looks_like_local_path(spec):
        raise DatasetError(
            f"no such file or folder: {spec}",
            hint="check the path; a Hub dataset id has the form org/name",
            code="DATASET_NOT_FOUND",
        )
    else:
        yield from _read_hub(
            spec,
            text_field=text_field,
            domain_field=domain_field,
            split=split,
            data_files=data_files,
            config_name=config_name,
        )


def _refuse_split(split: str, shown: str, what: str) -> None:
    """A split other than the default names nothing in local files: silently reading them all would
    evaluate on data the user meant to exclude."""
    if split != "train":
        raise UsageError(
            f"--split {split} cannot be used with {shown}: it is {what}, which has no splits",
            hint="pass the file that holds that split (e.g. validation.jsonl), or drop --split",
        )


def split_applies(spec: str) -> bool:
    """Whether ``--split`` means anything for this dataset: a Hub dataset or a saved ``DatasetDict``.

    A local file, or a folder of files, has no splits (what it holds is read whole).
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        return (path / "dataset_dict.json").is_file()
    return not path.exists() and not _looks_like_local_path(spec)


def _is_plain_text(spec: str) -> bool:
    return _format_of(Path(spec)) == "txt"


def _looks_like_local_path(spec: str) -> bool:
    """A spec that cannot be a Hub dataset id: a path with a file suffix, or one that says it is a path."""
    from moetool.io.source import looks_like_repo_id

    if spec.startswith((".", "/", "~")) or "\\" in spec or spec.count("/") > 1:
        return True
    if _suffix_of(Path(spec)) in SUPPORTED_SUFFIXES or spec.lower().endswith((".parquet", ".gz")):
        return True
    return not looks_like_repo_id(spec)


def _suffix_of(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if len(suffixes) >= 2 and suffixes[-1] == ".gz":
        return "".join(suffixes[-2:])
    return suffixes[-1] if suffixes else ""


def _format_of(path: Path) -> str | None:
    """``txt``, ``jsonl``, ``json``, ``csv``, ``tsv`` or ``parquet`` (None: not a supported file)."""
    suffix = _suffix_of(path)
    if suffix == ".parquet":
        return "parquet"
    return TEXT_FORMATS.get(suffix.removesuffix(".gz"))


def _unsupported(path: Path, shown: str) -> DatasetError:
    suffix = _suffix_of(path) or "(no extension)"
    return DatasetError(
        f"{shown}: unsupported file type {suffix}",
        hint="use .txt, .jsonl, .json, .csv, .tsv or .parquet (optionally .gz-compressed, Parquet excepted)",
        code="DATASET_FORMAT",
    )


def _read_folder(
    folder: Path,
    shown: str,
    text_field: str,
    domain_field: str | None,
    *,
    split: str,
    patterns: list[str],
) -> Iterator[Document]:
    saved_split = (folder / "dataset_info.json").is_file() and (folder / "state.json").is_file()
    if saved_split or (folder / "dataset_dict.json").is_file():
        yield from _read_saved_dataset(folder, shown, text_field, domain_field, split=split)
        return
    _refuse_split(split, shown, "a folder of data files")
    if patterns:
        chosen = {p for pattern in patterns for p in folder.glob(pattern) if p.is_file()}
        if not chosen:
            raise DatasetError(
                f"--data-files {' '.join(patterns)} matches no file in {shown}",
                hint="the patterns are globs relative to the dataset folder, e.g. 'train/*.jsonl'",
                code="DATASET_NOT_FOUND",
            )
        files = sorted(chosen)
        for path in files:
            if _format_of(path) is None:
                raise _unsupported(path, str(path))
    else:
        files, skipped = [], set()
        for root, dirs, names in os.walk(folder, followlinks=False):
            # Hidden folders (.git, .cache) hold no data; prune them from the walk.
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in names:
                if name.startswith("."):
                    continue
                path = Path(root) / name
                if _format_of(path) is None:
                    skipped.add(_suffix_of(path) or "(no extension)")
                else:
                    files.append(path)
        files.sort(key=lambda p: p.relative_to(folder).as_posix())
        if not files:
            if skipped:
                raise DatasetError(
                    f"{shown} holds no supported data file (found {', '.join(sorted(skipped))})",
                    hint="use .txt, .jsonl, .json, .csv, .tsv or .parquet files",
                    code="DATASET_FORMAT",
                )
            raise DatasetError(f"{shown} is an empty folder", code="DATASET_EMPTY")
    for path in files:
        yield from _read_file(path, shown=str(path), text_field=text_field, domain_field=domain_field)


def _read_file(path: Path, *, shown: str, text_field: str, domain_field: str | None) -> Iterator[Document]:
    fmt = _format_of(path)
    if fmt is None:
        raise _unsupported(path, shown)
    if fmt == "txt":
        if domain_field is not None:
            raise DatasetError(
                f"{shown} is plain text and has no field {domain_field!r}",
                hint="--domain-field needs .jsonl, .json, .csv, .tsv or .parquet records",
                code="DATASET_COLUMN",
            )
        yield from _read_txt(path, shown)
        return
    if fmt == "parquet":
        yield from _read_parquet(path, shown, text_field, domain_field)
        return
    reader = {"jsonl": _records_jsonl, "json": _records_json, "csv": _records_csv, "tsv": _records_csv}[fmt]
    with _open_text(path, shown) as stream:
        for where, record in reader(stream, shown, delimiter="\t" if fmt == "tsv" else ","):
            document = _to_document(record, where=where, text_field=text_field, domain_field=domain_field)
            if document is not None:
                yield document


class _open_text:  # a lower-case name: it is used like open()
    """Open a (possibly gzip-compressed) UTF-8 text file; decoding errors become DATASET_FORMAT."""

    def __init__(self, path: Path, shown: str) -> None:
        self.path, self.shown = path, shown

    def __enter__(self) -> io.TextIOBase:
        try:
            gz = self.path.name.lower().endswith(".gz")
            raw = gzip.open(self.path, "rb") if gz else open(self.path, "rb")
        except OSError as exc:
            raise DatasetError(f"cannot read {self.shown}: {exc.strerror or exc}", code="DATASET_NOT_FOUND") from None
        # newline="" keeps "\r\n" inside quoted CSV fields intact (the csv module's requirement);
        # the other readers strip line ends themselves.
        self.stream = io.TextIOWrapper(raw, encoding="utf-8-sig", newline="")
        return self.stream

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.stream.close()
        if isinstance(exc, UnicodeDecodeError):
            bad = exc.object[exc.start : exc.start + 1].hex()
            raise DatasetError(
                f"{self.shown} is not UTF-8 text (byte 0x{bad}: {exc.reason})",
                hint="convert the file to UTF-8",
                code="DATASET_FORMAT",
            ) from None
        if isinstance(exc, (gzip.BadGzipFile, EOFError)):
            raise DatasetError(
                f"{self.shown} is not a valid gzip file ({exc})", hint="re-create the file", code="DATASET_FORMAT"
            ) from None


def _lines(stream: io.TextIOBase) -> Iterator[tuple[int, str]]:
    """Numbered lines without their line end (newline="" leaves "\\r\\n" in place)."""
    for number, line in enumerate(stream, start=1):
        yield number, line.rstrip("\r\n")


def _read_txt(path: Path, shown: str) -> Iterator[Document]:
    with _open_text(path, shown) as stream:
        paragraph: list[str] = []
        for _, line in _lines(stream):
            if line.strip():
                paragraph.append(line)
            elif paragraph:
                yield Document("\n".join(paragraph))
                paragraph = []
        if paragraph:
            yield Document("\n".join(paragraph))


def _json_error(shown: str, line: int | None, exc: json.JSONDecodeError) -> DatasetError:
    where = f"{shown}:{line}" if line is not None else f"{shown}:{exc.lineno}:{exc.colno}"
    return DatasetError(
        f"{where}: invalid JSON ({exc.msg})",
        hint="fix the line, or remove it; each line of a .jsonl file must be one JSON object",
        code="DATASET_FORMAT",
    )


def _records_jsonl(stream: io.TextIOBase, shown: str, **_: Any) -> Iterator[tuple[str, Any]]:
    for number, line in _lines(stream):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _json_error(shown, number, exc) from None
        yield f"{shown}:{number}", record


def _records_json(stream: io.TextIOBase, shown: str, **_: Any) -> Iterator[tuple[str, Any]]:
    text = stream.read()
    if not text.strip():
        return  # an empty file: no records (DATASET_EMPTY if nothing else has any)
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        hint = "a .json dataset is a list of objects; for one object per line use the .jsonl extension"
        error = _json_error(shown, None, exc)
        raise DatasetError(error.message, hint=hint, code=error.code) from None
    records = document
    key = None
    if isinstance(document, dict):
        key = next((k for k in _JSON_LIST_KEYS if isinstance(document.get(k), list)), None)
        records = document[key] if key else None
    if not isinstance(records, list):
        raise DatasetError(
            f"{shown}: a JSON {type(document).__name__} without a list of records",
            hint='a .json dataset is a list of objects, or an object with the list under "data" or "rows"',
            code="DATASET_FORMAT",
        )
    prefix = f"{shown}:{key}" if key else shown
    for index, record in enumerate(records):
        yield f"{prefix}[{index}]", record


def _records_csv(stream: io.TextIOBase, shown: str, *, delimiter: str = ",") -> Iterator[tuple[str, Any]]:
    # The csv module refuses fields over 128 KiB by default; a document can be longer than that.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    reader = csv.DictReader(stream, delimiter=delimiter)
    try:
        if reader.fieldnames is None:
            return  # an empty file
        for record in reader:
            # The header is line 1; reader.line_num counts physical lines (quoted fields may span several).
            yield f"{shown}:{reader.line_num}", record
    except csv.Error as exc:
        raise DatasetError(
            f"{shown}:{reader.line_num}: invalid CSV ({exc})",
            hint="check the quoting on that line",
            code="DATASET_FORMAT",
        ) from None


def _fields(names: Iterable[Any]) -> str:
    names = [str(n) for n in names if n is not None]
    if not names:
        return "no fields"
    shown = ", ".join(repr(n) for n in names[:_FIELDS_SHOWN])
    more = len(names) - _FIELDS_SHOWN
    return f"fields present: {shown}" + (f" and {more} more" if more > 0 else "")


def _missing_field(where: str, field: str, present: Iterable[Any], *, domain: bool) -> DatasetError:
    what = "domain field" if domain else "text field"
    return DatasetError(
        f"{where}: no {what} {field!r} ({_fields(present)})",
        hint=HINT_DOMAIN_FIELD if domain else HINT_TEXT_FIELD,
        code="DATASET_COLUMN",
    )


def _to_document(record: Any, *, where: str, text_field: str, domain_field: str | None) -> Document | None:
    """One record as a Document (None when its text is empty), validated."""
    if isinstance(record, str) and domain_field is None:
        return Document(record) if record.strip() else None
    if not isinstance(record, dict):
        raise DatasetError(
            f"{where}: a JSON {type(record).__name__}, not an object",
            hint='each record must be an object such as {"text": "..."}',
            code="DATASET_FORMAT",
        )
    if text_field not in record:
        raise _missing_field(where, text_field, record, domain=False)
    text = record[text_field]
    domain: str | None = None
    if domain_field is not None:
        if domain_field not in record or record[domain_field] is None:
            raise _missing_field(where, domain_field, [k for k, v in record.items() if v is not None], domain=True)
        domain = str(record[domain_field])
    if text is None:
        return None
    if not isinstance(text, str):
        raise DatasetError(
            f"{where}: field {text_field!r} holds a {type(text).__name__}, not a string",
            hint="point --text-field at a column of strings",
            code="DATASET_COLUMN",
        )
    return Document(text, domain) if text.strip() else None


def _check_columns(columns: list[str], shown: str, text_field: str, domain_field: str | None) -> None:
    """Column-oriented sources (Parquet, datasets) have one schema: check it before reading rows."""
    if text_field not in columns:
        raise _missing_field(shown, text_field, columns, domain=False)
    if domain_field is not None and domain_field not in columns:
        raise _missing_field(shown, domain_field, columns, domain=True)


def _rows(columns: dict[str, list[Any]], shown: str, start: int) -> Iterator[tuple[str, dict[str, Any]]]:
    names = list(columns)
    for offset, values in enumerate(zip(*(columns[n] for n in names), strict=True)):
        yield f"{shown}[row {start + offset}]", dict(zip(names, values, strict=True))


def _read_parquet(path: Path, shown: str, text_field: str, domain_field: str | None) -> Iterator[Document]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MissingDependencyError(
            f"reading {shown} needs pyarrow, which is not installed", hint="pip install pyarrow"
        ) from None
    import pyarrow as pa

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise DatasetError(f"{shown} is not a valid Parquet file ({exc})", code="DATASET_FORMAT") from None
    columns = list(parquet.schema_arrow.names)
    _check_columns(columns, shown, text_field, domain_field)
    wanted = [text_field] + ([domain_field] if domain_field and domain_field != text_field else [])
    row = 0
    with parquet:
        for batch in parquet.iter_batches(batch_size=_ROW_BATCH, columns=wanted):
            data = batch.to_pydict()
            for where, record in _rows(data, shown, row):
                document = _to_document(record, where=where, text_field=text_field, domain_field=domain_field)
                if document is not None:
                    yield document
            row += batch.num_rows


def _import_datasets(shown: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise MissingDependencyError(
            f"loading the dataset {shown} needs the datasets package, which is not installed",
            hint="pip install datasets (or pass a local .txt, .jsonl, .json, .csv or .parquet file)",
        ) from None
    # datasets' own tqdm bars would interleave with our output; our progress covers the work.
    utils = getattr(datasets, "utils", None)
    if hasattr(utils, "disable_progress_bars"):
        utils.disable_progress_bars()
    return datasets


def _datasets_rows(dataset: Any, shown: str, text_field: str, domain_field: str | None) -> Iterator[Document]:
    columns = list(dataset.column_names)
    _check_columns(columns, shown, text_field, domain_field)
    wanted = [text_field] + ([domain_field] if domain_field and domain_field != text_field else [])
    if hasattr(dataset, "select_columns"):
        # Decoding only the columns we need: a dataset may carry images or token ids besides the text.
        dataset = dataset.select_columns(wanted)
    if hasattr(dataset, "iter"):
        row = 0
        for batch in dataset.iter(batch_size=_ROW_BATCH):
            for where, record in _rows(batch, shown, row):
                document = _to_document(record, where=where, text_field=text_field, domain_field=domain_field)
                if document is not None:
                    yield document
            row += len(batch[text_field])
        return
    for index, record in enumerate(dataset):
        document = _to_document(record, where=f"{shown}[row {index}]", text_field=text_field, domain_field=domain_field)
        if document is not None:
            yield document


def _read_saved_dataset(
    folder: Path, shown: str, text_field: str, domain_field: str | None, *, split: str
) -> Iterator[Document]:
    datasets = _import_datasets(shown)
    try:
        loaded = datasets.load_from_disk(str(folder))
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot load the saved dataset {shown}: {exc}", code="DATASET_FORMAT") from None
    if isinstance(getattr(loaded, "column_names", None), dict):  # a DatasetDict: pick the split
        if split not in loaded:
            raise DatasetError(
                f"the saved dataset {shown} has no split {split!r} (splits: {', '.join(loaded)})",
                hint="pass --split with one of those",
                code="DATASET_SPLIT",
            )
        loaded = loaded[split]
    yield from _datasets_rows(loaded, f"{shown} ({split})", text_field, domain_field)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _read_hub(
    spec: str,
    *,
    text_field: str,
    domain_field: str | None,
    split: str,
    data_files: str | list[str] | None,
    config_name: str | None,
) -> Iterator[Document]:
    datasets = _import_datasets(spec)
    kwargs: dict[str, Any] = {"split": split}
    if data_files:
        kwargs["data_files"] = data_files
    shown = spec + (f" ({config_name})" if config_name else "") + f" split {split!r}"
    try:
        dataset = datasets.load_dataset(spec, config_name, **kwargs)
    except MissingDependencyError:
        raise
    except FileNotFoundError as exc:  # datasets' DatasetNotFoundError is one
        raise DatasetError(
            f"no dataset {spec!r} on the Hub or in the datasets cache ({_first_line(exc)})",
            hint="check the id (org/name); offline, load it once online first; for a local file check the path",
            code="DATASET_NOT_FOUND",
        ) from None
    except ConnectionError as exc:
        raise DatasetError(
            f"cannot reach the Hub for the dataset {spec!r}, and it is not cached ({_first_line(exc)})",
            hint="check the network, or run once online to fill the datasets cache",
            code="DATASET_NOT_FOUND",
        ) from None
    except ValueError as exc:
        message = _first_line(exc)
        if "split" in message.lower():
            raise DatasetError(
                f"{spec}: {message}", hint="pass --split with a split the dataset has", code="DATASET_SPLIT"
            ) from None
        if "config" in message.lower():
            raise DatasetError(
                f"{spec}: {message}",
                hint="pass --dataset-config with one of the configurations it lists",
                code="DATASET_FORMAT",
            ) from None
        raise DatasetError(f"cannot load the dataset {spec!r}: {message}", code="DATASET_FORMAT") from None
    yield from _datasets_rows(dataset, shown, text_field, domain_field)


# ----------------------------------------------------------------------------- windows and batches


def _encode(tokenizer: Any, text: str) -> list[int]:
    # verbose=False: documents are longer than model_max_length on purpose (they are cut into windows),
    # so transformers' "sequence length is longer than the specified maximum" warning does not apply.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return list(ids)


def iter_windows(
    tokenizer: Any,
    documents: Iterable[Document],
    *,
    seq_len: int,
    max_tokens: int | None = None,
) -> Iterator[Window]:
    """Tokenize documents and pack them into windows of ``seq_len`` tokens, one domain at a time.

    Each document is tokenized without special tokens and followed by the tokenizer's end-of-sequence
    token (when it has one), so that a window spanning two documents shows where one ends. Documents
    of the same domain are concatenated into non-overlapping windows of exactly ``seq_len`` tokens; a
    window never mixes domains (one buffer per domain), and windows are yielded as soon as a buffer
    fills, so the order is deterministic. At the end, each domain's remainder (if it holds at least
    2 tokens, the fewest a window can score) becomes one shorter window, in the order the domains were
    first seen.

    Streaming: documents are tokenized one at a time, and memory holds one partial buffer per domain.

    Args:
        tokenizer: a transformers tokenizer.
        documents: the documents, e.g. from :func:`load_documents`.
        seq_len: tokens per window (at least 2).
        max_tokens: stop once this many tokens have been yielded; the last window is cut short so the
            total is exactly ``max_tokens`` (when the data holds that many). ``None``: no limit.

    Yields:
        The windows.

    Raises:
        UsageError: ``seq_len`` below 2 or ``max_tokens`` below 1.
    """
    if seq_len < 2:
        raise UsageError(f"--seq-len must be at least 2, not {seq_len}")
    if max_tokens is not None and max_tokens < 1:
        raise UsageError(f"--max-tokens must be at least 1, not {max_tokens}")
    eos = getattr(tokenizer, "eos_token_id", None)
    buffers: dict[str | None, list[int]] = {}
    left = max_tokens

    def emit(ids: list[int], domain: str | None) -> Window:
        nonlocal left
        if left is not None:
            ids = ids[:left]
            left -= len(ids)
        return Window(ids, domain)

    for document in documents:
        ids = _encode(tokenizer, document.text)
        if eos is not None:
            ids.append(eos)
        buffer = buffers.setdefault(document.domain, [])
        buffer.extend(ids)
        start = 0
        while len(buffer) - start >= seq_len:
            yield emit(buffer[start : start + seq_len], document.domain)
            start += seq_len
            if left == 0:
                return
        del buffer[:start]
    for domain, buffer in buffers.items():
        if len(buffer) >= 2:
            yield emit(buffer, domain)
            if left == 0:
                return


def iter_batches(windows: Iterable[Window], *, batch_size: int, pad_id: int = 0) -> Iterator[Batch]:
    """Group windows into right-padded batches (the last one may be smaller).

    Args:
        windows: e.g. from :func:`iter_windows`.
        batch_size: windows per batch (at least 1).
        pad_id: the id written at padding positions (masked out: any valid id will do).

    Yields:
        Batches whose width is the longest window they hold.

    Raises:
        UsageError: ``batch_size`` below 1.
    """
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, not {batch_size}")
    pending: list[Window] = []
    for window in windows:
        pending.append(window)
        if len(pending) == batch_size:
            yield _stack(pending, pad_id)
            pending = []
    if pending:
        yield _stack(pending, pad_id)


def _stack(windows: list[Window], pad_id: int) -> Batch:
    import torch

    width = max(len(w.input_ids) for w in windows)
    input_ids = torch.full((len(windows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(windows), width), dtype=torch.long)
    for row, window in enumerate(windows):
        n = len(window.input_ids)
        input_ids[row, :n] = torch.tensor(window.input_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
    return Batch(input_ids=input_ids, attention_mask=attention_mask, domains=[w.domain for w in windows])
