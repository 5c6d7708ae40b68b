"""Tests for moetool.data: dataset formats, validation errors, token windows and batches (CHECKLISTS A25, B29).

No network: Hub datasets are played by a fake ``datasets`` module; the real ``datasets`` / ``pyarrow``
paths run when those optional packages are installed, and are skipped otherwise.
"""

from __future__ import annotations

import gzip
import json
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from moetool.data import Document, Window, iter_batches, iter_documents, iter_windows, load_documents
from moetool.errors import DatasetError, MissingDependencyError, UsageError
from tests.helpers import WORDS, make_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def jsonl(path: Path, records: list) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in records))


def texts(documents: list[Document]) -> list[str]:
    return [d.text for d in documents]


def error_of(excinfo: pytest.ExceptionInfo) -> tuple[str, str]:
    return excinfo.value.code, excinfo.value.message


# ----------------------------------------------------------------------------- formats


def test_txt_one_document_per_paragraph(tmp_path):
    path = write(tmp_path / "a.txt", "first line\nsame paragraph\n\n\n   \nsecond\r\n\r\nthird  \n")
    assert texts(load_documents(str(path))) == ["first line\nsame paragraph", "second", "third  "]
    assert all(d.domain is None for d in load_documents(str(path)))


def test_jsonl_with_domains_skips_empty_text(tmp_path):
    path = jsonl(
        tmp_path / "d.jsonl",
        [
            {"text": "the cat", "src": "web", "n": 1},
            {"text": "", "src": "web"},
            {"text": None, "src": "code"},
            {"text": "  \n ", "src": "code"},
            {"text": "def f", "src": 7},
        ],
    )
    (tmp_path / "d.jsonl").write_text(path.read_text() + "\n   \n", encoding="utf-8")  # trailing blank lines
    documents = load_documents(str(path), domain_field="src")
    assert documents == [Document("the cat", "web"), Document("def f", "7")]
    assert [d.domain for d in load_documents(str(path))] == [None, None]


def test_json_list_data_rows_and_strings(tmp_path):
    records = [{"body": "one"}, {"body": "two"}]
    for name, doc in (("list.json", records), ("data.json", {"data": records}), ("rows.json", {"rows": records})):
        write(tmp_path / name, json.dumps(doc))
        assert texts(load_documents(str(tmp_path / name), text_field="body")) == ["one", "two"]
    write(tmp_path / "strings.json", json.dumps(["a text", "", "another"]))
    assert texts(load_documents(str(tmp_path / "strings.json"))) == ["a text", "another"]


def test_csv_and_tsv(tmp_path):
    write(tmp_path / "d.csv", 'text,domain\n"multi\nline, quoted",code\nplain,web\n,web\n')
    documents = load_documents(str(tmp_path / "d.csv"), domain_field="domain")
    assert documents == [Document("multi\nline, quoted", "code"), Document("plain", "web")]
    write(tmp_path / "d.tsv", "domain\ttext\nmath\tone two\n")
    assert load_documents(str(tmp_path / "d.tsv"), domain_field="domain") == [Document("one two", "math")]


def test_csv_long_field(tmp_path):
    long = "word " * 60_000  # 300 KB: above the csv module's default field size limit
    write(tmp_path / "long.csv", f"text\n{long}\n")
    assert texts(load_documents(str(tmp_path / "long.csv"))) == [long]


def test_gzip(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "zipped"}) + "\n")
    assert texts(load_documents(str(path))) == ["zipped"]
    write(tmp_path / "bad.txt.gz", b"not gzip at all")
    with pytest.raises(DatasetError) as excinfo:
        load_documents(str(tmp_path / "bad.txt.gz"))
    assert excinfo.value.code == "DATASET_FORMAT"


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table(
        {"text": ["alpha", "", None, "beta"] * 600, "lang": ["en", "en", "fr", "de"] * 600, "n": [1] * 2400}
    )
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=500)
    documents = load_documents(str(tmp_path / "d.parquet"), domain_field="lang")
    assert documents[:2] == [Document("alpha", "en"), Document("beta", "de")]
    assert len(documents) == 1200
    with pytest.raises(DatasetError) as excinfo:
        load_documents(str(tmp_path / "d.parquet"), text_field="body")
    assert excinfo.value.code == "DATASET_COLUMN"
    assert "'text'" in excinfo.value.message and "'lang'" in excinfo.value.message


def test_parquet_without_pyarrow(tmp_path, monkeypatch):
    write(tmp_path / "d.parquet", b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(MissingDependencyError, match="pyarrow") as excinfo:
        load_documents(str(tmp_path / "d.parquet"))
    assert "pip install pyarrow" in excinfo.value.hint


def test_folder_recursive_sorted_skipping_others(tmp_path):
    jsonl(tmp_path / "b.jsonl", [{"text": "from b"}])
    write(tmp_path / "a.txt", "from a\n\nalso a")
    jsonl(tmp_path / "sub" / "c.jsonl", [{"text": "from sub/c"}])
    write(tmp_path / "README.md", "# not data")
    jsonl(tmp_path / ".hidden" / "x.jsonl", [{"text": "hidden"}])
    jsonl(tmp_path / ".x.jsonl", [{"text": "hidden file"}])
    assert texts(load_documents(str(tmp_path))) == ["from a", "also a", "from b", "from sub/c"]
    only = load_documents(str(tmp_path), data_files=["sub/*.jsonl", "b.jsonl"])
    assert texts(only) == ["from b", "from sub/c"]
    with pytest.raises(DatasetError) as excinfo:
        load_documents(str(tmp_path), data_files="nothing/*.csv")
    assert excinfo.value.code == "DATASET_NOT_FOUND"
    with pytest.raises(UsageError):
        load_documents(str(tmp_path / "b.jsonl"), data_files="*.jsonl")


def test_iter_documents_is_lazy(tmp_path):
    lines = [json.dumps({"text": f"doc {i}"}) for i in range(3)] + ["{broken"]
    write(tmp_path / "d.jsonl", "\n".join(lines))
    stream = iter_documents(str(tmp_path / "d.jsonl"))
    assert [next(stream).text for _ in range(3)] == ["doc 0", "doc 1", "doc 2"]
    with pytest.raises(DatasetError):
        next(stream)


# ----------------------------------------------------------------------------- bad inputs (B29)


@pytest.mark.parametrize(
    ("name", "content", "kwargs", "code", "needles"),
    [
        ("empty.jsonl", "", {}, "DATASET_EMPTY", ["no non-empty text"]),
        ("blank.jsonl", "\n\n  \n", {}, "DATASET_EMPTY", []),
        ("blank.txt", "\n   \n\n", {}, "DATASET_EMPTY", []),
        ("empty.json", "", {}, "DATASET_EMPTY", []),
        ("empty.csv", "", {}, "DATASET_EMPTY", []),
        ("header-only.csv", "text,domain\n", {}, "DATASET_EMPTY", []),
        ("all-empty.jsonl", '{"text": ""}\n{"text": null}\n', {}, "DATASET_EMPTY", []),
        (
            "col.jsonl",
            '{"content": "x", "id": 1}\n',
            {},
            "DATASET_COLUMN",
            ["'text'", "'content'", "'id'", "col.jsonl:1"],
        ),
        ("dom.jsonl", '{"text": "x", "lang": "en"}\n', {"domain_field": "src"}, "DATASET_COLUMN", ["'src'", "'lang'"]),
        ("dom2.jsonl", '{"text": "x", "src": "a"}\n{"text": "y"}\n', {"domain_field": "src"}, "DATASET_COLUMN", [":2"]),
        ("col.csv", "body\nx\n", {}, "DATASET_COLUMN", ["'body'"]),
        ("type.jsonl", '{"text": ["a", "b"]}\n', {}, "DATASET_COLUMN", ["list, not a string"]),
        ("bad.jsonl", '{"text": "ok"}\n\n{"text": "no end}\n', {}, "DATASET_FORMAT", ["bad.jsonl:3", "invalid JSON"]),
        ("bad.json", '[{"text": "a"},', {}, "DATASET_FORMAT", ["bad.json:1:"]),
        ("obj.json", '{"text": "a single object"}', {}, "DATASET_FORMAT", ["without a list"]),
        ("num.jsonl", "42\n", {}, "DATASET_FORMAT", ["num.jsonl:1", "int, not an object"]),
        ("data.xlsx", "whatever", {}, "DATASET_FORMAT", ["unsupported file type .xlsx"]),
        ("noext", "whatever", {}, "DATASET_FORMAT", ["(no extension)"]),
        ("latin1.txt", b"caf\xe9\n", {}, "DATASET_FORMAT", ["not UTF-8", "0xe9"]),
        ("plain.txt", "text", {"domain_field": "src"}, "DATASET_COLUMN", ["plain text"]),
    ],
)
def test_bad_dataset(tmp_path, name, content, kwargs, code, needles):
    path = write(tmp_path / name, content)
    with pytest.raises(DatasetError) as excinfo:
        load_documents(str(path), **kwargs)
    assert excinfo.value.code == code, excinfo.value.message
    for needle in needles:
        assert needle in excinfo.value.message, excinfo.value.message
    assert excinfo.value.hint or code == "DATASET_EMPTY"


def test_missing_path_and_folders(tmp_path):
    for spec in (str(tmp_path / "missing.jsonl"), "./missing/", "missing.jsonl", "a/b/c"):
        with pytest.raises(DatasetError) as excinfo:
            load_documents(spec)
        assert excinfo.value.code == "DATASET_NOT_FOUND", spec
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError) as excinfo:
        load_documents(str(tmp_path / "empty"))
    assert excinfo.value.code == "DATASET_EMPTY"
    write(tmp_path / "docs" / "notes.md", "x")
    with pytest.raises(DatasetError) as excinfo:
        load_documents(str(tmp_path / "docs"))
    assert excinfo.value.code == "DATASET_FORMAT" and ".md" in excinfo.value.message
    with pytest.raises(UsageError):
        load_documents("")


# ----------------------------------------------------------------------------- Hub datasets


class FakeDataset:
    """Just what moetool.data uses of a datasets.Dataset."""

    def __init__(self, rows: dict[str, list]):
        self.rows = rows
        self.column_names = list(rows)

    def select_columns(self, columns: list[str]) -> FakeDataset:
        return FakeDataset({c: self.rows[c] for c in columns})

    def iter(self, batch_size: int) -> Iterator[dict[str, list]]:
        n = len(next(iter(self.rows.values())))
        for start in range(0, n, batch_size):
            yield {c: v[start : start + batch_size] for c, v in self.rows.items()}


@pytest.fixture
def fake_datasets(monkeypatch):
    calls = []

    def load_dataset(path, name=None, *, split, data_files=None):
        calls.append((path, name, split, data_files))
        if path == "org/missing":
            raise FileNotFoundError("Dataset 'org/missing' doesn't exist on the Hub or cannot be accessed.")
        if split not in ("train", "test"):
            raise ValueError(f"Unknown split \"{split}\". Should be one of ['train', 'test'].")
        return FakeDataset({"text": ["hub one", "", "hub two"], "label": [0, 1, 0], "topic": ["a", "b", "c"]})

    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", module)
    return calls


def test_hub_dataset(fake_datasets):
    documents = load_documents("org/corpus", split="test", domain_field="topic", config_name="v1")
    assert documents == [Document("hub one", "a"), Document("hub two", "c")]
    assert fake_datasets == [("org/corpus", "v1", "test", None)]
    load_documents("json", data_files=["x.jsonl"])
    assert fake_datasets[-1] == ("json", None, "train", ["x.jsonl"])


@pytest.mark.parametrize(
    ("spec", "kwargs", "code"),
    [
        ("org/missing", {}, "DATASET_NOT_FOUND"),
        ("org/corpus", {"split": "validation"}, "DATASET_SPLIT"),
        ("org/corpus", {"text_field": "content"}, "DATASET_COLUMN"),
        ("org/corpus", {"domain_field": "source"}, "DATASET_COLUMN"),
    ],
)
def test_hub_dataset_errors(fake_datasets, spec, kwargs, code):
    with pytest.raises(DatasetError) as excinfo:
        load_documents(spec, **kwargs)
    assert excinfo.value.code == code


def test_hub_dataset_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(MissingDependencyError) as excinfo:
        load_documents("org/corpus")
    assert "pip install datasets" in excinfo.value.hint


def test_real_datasets_package(tmp_path):
    """With datasets installed: a builder name + data_files, and a save_to_disk folder."""
    datasets = pytest.importorskip("datasets")
    path = jsonl(tmp_path / "src" / "d.jsonl", [{"text": "first", "d": "x"}, {"text": "second", "d": "y"}])
    documents = load_documents("json", data_files=[str(path)], domain_field="d")
    assert documents == [Document("first", "x"), Document("second", "y")]
    datasets.Dataset.from_dict({"text": ["saved"]}).save_to_disk(str(tmp_path / "saved"))
    assert texts(load_documents(str(tmp_path / "saved"))) == ["saved"]
    splits = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"text": ["tr"]}), test=datasets.Dataset.from_dict({"text": ["te"]})
    )
    splits.save_to_disk(str(tmp_path / "dict"))
    assert texts(load_documents(str(tmp_path / "dict"), split="test")) == ["te"]
    with pytest.raises(DatasetError) as excinfo:
        load_documents(str(tmp_path / "dict"), split="validation")
    assert excinfo.value.code == "DATASET_SPLIT"


# ----------------------------------------------------------------------------- windows


def ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def docs_of_lengths(lengths: list[int], domain: str | None = None, offset: int = 0) -> list[Document]:
    """Documents of the given word counts; words cycle through WORDS so every token is known."""
    documents = []
    for i, n in enumerate(lengths):
        words = [WORDS[(offset + i + j) % len(WORDS)] for j in range(n)]
        documents.append(Document(" ".join(words), domain))
    return documents


def joined(windows: list[Window]) -> list[int]:
    return [token for window in windows for token in window.input_ids]


def stream_of(tokenizer, documents: list[Document]) -> list[int]:
    eos = tokenizer.eos_token_id
    out: list[int] = []
    for d in documents:
        out += ids_of(tokenizer, d.text) + ([eos] if eos is not None else [])
    return out


def test_windows_pack_exactly_with_eos_between_documents(tokenizer):
    documents = docs_of_lengths([5, 9, 3, 12, 7])  # 36 words + 5 eos = 41 tokens
    windows = list(iter_windows(tokenizer, documents, seq_len=8))
    assert [len(w.input_ids) for w in windows] == [8] * 5  # 40 tokens, and a remainder of 1: dropped
    assert joined(windows) == stream_of(tokenizer, documents)[:40]
    eos = tokenizer.eos_token_id
    assert windows[0].input_ids[5] == eos  # the first document's 5 words, then eos
    assert windows[0].input_ids[:5] == ids_of(tokenizer, documents[0].text)


def test_windows_remainder_kept_when_two_tokens(tokenizer):
    documents = docs_of_lengths([5, 4])  # 11 tokens
    windows = list(iter_windows(tokenizer, documents, seq_len=4))
    assert [len(w.input_ids) for w in windows] == [4, 4, 3]
    assert joined(windows) == stream_of(tokenizer, documents)


def test_windows_never_mix_domains(tokenizer):
    code = docs_of_lengths([3, 6, 2, 9], "code")
    web = docs_of_lengths([7, 1, 8], "web", offset=11)
    interleaved = [code[0], web[0], code[1], web[1], code[2], web[2], code[3]]
    windows = list(iter_windows(tokenizer, interleaved, seq_len=5))
    for domain, documents in (("code", code), ("web", web)):
        mine = [w for w in windows if w.domain == domain]
        assert joined(mine) == stream_of(tokenizer, documents)
        assert all(len(w.input_ids) == 5 for w in mine[:-1])
    # Yielded as soon as a domain's buffer fills: code's first window (4 + 7 tokens) before web's.
    assert [w.domain for w in windows][:3] == ["web", "code", "code"]
    assert windows == list(iter_windows(tokenizer, interleaved, seq_len=5))  # deterministic


def test_windows_max_tokens_exact(tokenizer):
    documents = docs_of_lengths([10] * 20, "a") + docs_of_lengths([10] * 20, "b")
    stream = stream_of(tokenizer, documents[:20])
    for max_tokens in (1, 7, 16, 17, 100):
        windows = list(iter_windows(tokenizer, documents, seq_len=16, max_tokens=max_tokens))
        assert sum(len(w.input_ids) for w in windows) == max_tokens
        assert joined(windows) == stream[:max_tokens]
    # Fewer tokens than asked for: all of them.
    total = sum(len(w.input_ids) for w in iter_windows(tokenizer, documents[:2], seq_len=16, max_tokens=10_000))
    assert total == 22


def test_windows_stream_lazily(tokenizer):
    consumed = 0

    def endless() -> Iterator[Document]:
        nonlocal consumed
        while True:
            consumed += 1
            yield Document("the cat sat on a mat")

    windows = list(iter_windows(tokenizer, endless(), seq_len=7, max_tokens=70))
    assert len(windows) == 10 and consumed == 10


def test_windows_without_eos_and_bad_arguments(tokenizer):
    no_eos = make_tokenizer(eos=False)
    documents = docs_of_lengths([3, 3])
    assert [w.input_ids for w in iter_windows(no_eos, documents, seq_len=6)] == [stream_of(no_eos, documents)]
    with pytest.raises(UsageError):
        list(iter_windows(tokenizer, documents, seq_len=1))
    with pytest.raises(UsageError):
        list(iter_windows(tokenizer, documents, seq_len=4, max_tokens=0))


def test_no_long_sequence_warning(tokenizer, capsys, caplog):
    saved, tokenizer.model_max_length = tokenizer.model_max_length, 8
    try:
        list(iter_windows(tokenizer, docs_of_lengths([50]), seq_len=8))
    finally:
        tokenizer.model_max_length = saved
    assert "longer than the specified maximum" not in capsys.readouterr().err + caplog.text


# ----------------------------------------------------------------------------- batches


def test_batches_right_padded():
    import torch

    windows = [Window([5, 6, 7], "a"), Window([8, 9, 10], None), Window([11, 12], "b"), Window([13, 14, 15], "a")]
    batches = list(iter_batches(windows, batch_size=3, pad_id=1))
    assert [b.input_ids.shape for b in batches] == [torch.Size([3, 3]), torch.Size([1, 3])]
    first = batches[0]
    assert first.input_ids.dtype == torch.long and first.attention_mask.dtype == torch.long
    assert first.input_ids.tolist() == [[5, 6, 7], [8, 9, 10], [11, 12, 1]]
    assert first.attention_mask.tolist() == [[1, 1, 1], [1, 1, 1], [1, 1, 0]]
    assert first.domains == ["a", None, "b"]
    assert batches[1].domains == ["a"]
    assert list(iter_batches([], batch_size=2)) == []
    with pytest.raises(UsageError):
        list(iter_batches(windows, batch_size=0))


def test_data_module_does_not_import_torch():
    import subprocess

    code = "import sys, moetool.data, moetool.modeling, moetool.evaluate; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
