"""Tests for moetool.io.source: local folders, Hub repo ids, Hub errors, offline mode (CHECKLISTS A1-A6,
B12, B30, B31).

Nothing here reaches the network: an autouse fixture refuses (and records) every socket connect. The Hub
is played either by monkeypatched huggingface_hub functions, or by :class:`FakeHub`, an in-process fake
served through ``httpx2.MockTransport`` and plugged into huggingface_hub's client factory, so that the
real ``snapshot_download`` / ``get_safetensors_metadata`` code runs against it (cache layout, refs,
tree listings, range requests and error classes all come from huggingface_hub itself).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import socket
import struct
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

import httpx2
import huggingface_hub as hfh
import numpy as np
import pytest
from huggingface_hub import constants as hf_constants
from huggingface_hub import errors as hf_errors
from huggingface_hub.utils import _http as hf_http
from huggingface_hub.utils import hf_raise_for_status
from huggingface_hub.utils._safetensors import (
    SafetensorsFileMetadata,
    SafetensorsRepoMetadata,
)
from huggingface_hub.utils._safetensors import (
    TensorInfo as HubTensorInfo,
)
from huggingface_hub.utils._validators import validate_repo_id
from safetensors.numpy import save

import moetool.io.source as source
from moetool.errors import (
    EXIT_USAGE,
    CheckpointError,
    ConfigError,
    MoetoolError,
    PickleRefusedError,
    SourceNotFoundError,
    UsageError,
)
from moetool.io.source import (
    ModelRef,
    hub_disable_progress_bars,
    looks_like_repo_id,
    open_model,
    parse_model_ref,
)

# huggingface_hub.utils exports a `tqdm` class that shadows its `tqdm` module: fetch the module itself.
hf_tqdm = importlib.import_module("huggingface_hub.utils.tqdm")

SHA = "0123456789abcdef0123456789abcdef01234567"
SHA_DEV = "fedcba9876543210fedcba9876543210fedcba98"
SHA_PR = "1111111111222222222233333333334444444444"
CONFIG = {"model_type": "mixtral", "num_local_experts": 2, "hidden_size": 4, "num_hidden_layers": 1}
REPO = "org/tiny-moe"

# --------------------------------------------------------------------------- fixture data


def tensors_of(k: int) -> dict[str, np.ndarray]:
    """Small, distinct tensors for shard ``k`` (two experts of one layer, and the router)."""
    return {
        f"model.layers.{k}.block_sparse_moe.gate.weight": np.zeros((2, 4), dtype=np.float32),
        f"model.layers.{k}.block_sparse_moe.experts.0.w1.weight": np.ones((3, 4), dtype=np.float16),
        f"model.layers.{k}.block_sparse_moe.experts.1.w1.weight": np.full((3, 4), 2, dtype=np.float16),
    }


def st_bytes(k: int = 0) -> bytes:
    return save(tensors_of(k), metadata={"format": "pt"})


def sharded_files(n: int = 2) -> dict[str, bytes]:
    """config.json, n shards and their index."""
    files: dict[str, bytes] = {"config.json": json.dumps(CONFIG).encode()}
    weight_map = {}
    for k in range(n):
        name = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        files[name] = st_bytes(k)
        weight_map.update(dict.fromkeys(tensors_of(k), name))
    total = sum(a.nbytes for k in range(n) for a in tensors_of(k).values())
    files["model.safetensors.index.json"] = json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}
    ).encode()
    return files


def single_files() -> dict[str, bytes]:
    return {"config.json": json.dumps(CONFIG).encode(), "model.safetensors": st_bytes(0)}


def hub_metadata(files: dict[str, bytes]) -> SafetensorsRepoMetadata:
    """A real huggingface_hub SafetensorsRepoMetadata for the safetensors files in ``files``."""
    files_metadata = {}
    weight_map = {}
    for name, data in files.items():
        if not name.endswith(".safetensors"):
            continue
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        meta = header.pop("__metadata__", {})
        tensors = {
            t: HubTensorInfo(dtype=e["dtype"], shape=e["shape"], data_offsets=tuple(e["data_offsets"]))
            for t, e in header.items()
        }
        files_metadata[name] = SafetensorsFileMetadata(metadata=meta, tensors=tensors)
        weight_map.update(dict.fromkeys(tensors, name))
    index = files.get("model.safetensors.index.json")
    return SafetensorsRepoMetadata(
        metadata=json.loads(index)["metadata"] if index else None,
        sharded=index is not None,
        weight_map=weight_map,
        files_metadata=files_metadata,
    )


def write_folder(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def hub_error(status: int, error_code: str | None = None, message: str | None = None) -> Exception:
    """The exception huggingface_hub itself raises for such a Hub response (built by hf_raise_for_status)."""
    headers = {}
    if error_code:
        headers["X-Error-Code"] = error_code
    if message:
        headers["X-Error-Message"] = message
    request = httpx2.Request("GET", f"https://huggingface.co/api/models/{REPO}/revision/main")
    try:
        hf_raise_for_status(httpx2.Response(status, headers=headers, request=request))
    except Exception as exc:
        return exc
    raise AssertionError(f"HTTP {status} did not raise")


def assert_one_line(err: MoetoolError) -> None:
    assert "\n" not in str(err), str(err)
    assert err.hint
    # raised "from None": the user sees our line, not huggingface_hub's traceback chain
    assert err.__cause__ is None and err.__suppress_context__


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> list:
    """Refuse and record every outgoing socket connection: no test may reach the real Hub."""
    attempts: list = []

    def refuse(self: socket.socket, address: object, *args: object) -> None:
        attempts.append(address)
        raise OSError("network access is disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


@pytest.fixture(autouse=True)
def hub_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hub cache, no token and no offline setting inherited from the machine.

    huggingface_hub reads HF_HUB_CACHE / HF_HUB_OFFLINE at import, so its constants are patched too.
    """
    cache = tmp_path / "hf-cache"
    for var in (
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "HF_HUB_DISABLE_PROGRESS_BARS",
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    saved = dict(hf_tqdm.progress_bar_states)
    yield cache
    hf_tqdm.progress_bar_states.clear()
    hf_tqdm.progress_bar_states.update(saved)


def go_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE=1 as the user sets it (the env) and as huggingface_hub saw it at import."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    authorization: str | None


@dataclass
class FakeRepo:
    refs: dict[str, str]  # branch / tag / refs/pr/N -> commit sha
    commits: dict[str, dict[str, bytes]]  # commit sha -> files
    gated: bool = False


@dataclass
class FakeHub:
    """Just enough of the Hub's HTTP API for huggingface_hub's download and metadata functions."""

    repos: dict[str, FakeRepo] = field(default_factory=dict)
    requests: list[Request] = field(default_factory=list)
    status: int | None = None  # when set, every request fails with this HTTP status

    def add(self, repo_id: str, files: dict[str, bytes], *, sha: str = SHA, gated: bool = False) -> FakeRepo:
        repo = FakeRepo(refs={"main": sha}, commits={sha: files}, gated=gated)
        self.repos[repo_id] = repo
        return repo

    def downloads(self) -> list[str]:
        """Files fetched in full (GET without a Range header)."""
        return [
            r.path.rsplit("/", 1)[-1]
            for r in self.requests
            if r.method == "GET" and "/resolve/" in r.path and not r.range
        ]

    def ranged(self) -> list[str]:
        return [r.path.rsplit("/", 1)[-1] for r in self.requests if r.method == "GET" and r.range]

    @staticmethod
    def _error(status: int, code: str | None = None) -> httpx2.Response:
        return httpx2.Response(status, headers={"X-Error-Code": code} if code else {})

    def handler(self, request: httpx2.Request) -> httpx2.Response:
        path = request.url.raw_path.decode().split("?")[0]
        if path == "/api/agent-harnesses":  # huggingface_hub's user-agent registry fetch: not ours
            return self._error(404)
        self.requests.append(
            Request(
                request.method,
                unquote(path),
                request.headers.get("range"),
                request.headers.get("authorization"),
            )
        )
        if self.status is not None:
            return self._error(self.status)
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
            return self._info(m.group(1), unquote(m.group(2) or "main"))
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)", path):
            return self._tree(m.group(1), unquote(m.group(2)))
        if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            return self._resolve(request, m.group(1), unquote(m.group(2)), unquote(m.group(3)))
        return self._error(404, "RepoNotFound")

    def _lookup(self, repo_id: str, revision: str) -> tuple[str, dict[str, bytes]] | httpx2.Response:
        repo = self.repos.get(repo_id)
        if repo is None:
            return self._error(401, "RepoNotFound")  # the Hub answers 401 for missing and private repos
        if repo.gated:
            return self._error(403, "GatedRepo")
        sha = revision if revision in repo.commits else repo.refs.get(revision)
        if sha is None:
            return self._error(404, "RevisionNotFound")
        return sha, repo.commits[sha]

    def _info(self, repo_id: str, revision: str) -> httpx2.Response:
        found = self._lookup(repo_id, revision)
        if isinstance(found, httpx2.Response):
            return found
        sha, files = found
        return httpx2.Response(200, json={"id": repo_id, "sha": sha, "siblings": [{"rfilename": f} for f in files]})

    def _tree(self, repo_id: str, revision: str) -> httpx2.Response:
        found = self._lookup(repo_id, revision)
        if isinstance(found, httpx2.Response):
            return found
        items = []
        for name, data in found[1].items():
            item = {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
            if name.endswith(".safetensors"):
                item["lfs"] = {"size": len(data), "oid": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
            items.append(item)
        return httpx2.Response(200, json=items)

    def _resolve(self, request: httpx2.Request, repo_id: str, revision: str, name: str) -> httpx2.Response:
        found = self._lookup(repo_id, revision)
        if isinstance(found, httpx2.Response):
            return found
        sha, files = found
        if name not in files:
            return self._error(404, "EntryNotFound")
        data = files[name]
        lfs = name.endswith(".safetensors")
        etag = hashlib.sha256(data).hexdigest() if lfs else hashlib.sha1(data).hexdigest()
        headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Content-Length": str(len(data))}
        if request.method == "HEAD":
            return httpx2.Response(200, headers=headers)
        if rng := request.headers.get("range"):
            start, end = (int(x) for x in rng.split("=")[1].split("-"))
            part = data[start : end + 1]
            headers["Content-Length"] = str(len(part))
            return httpx2.Response(206, headers=headers, content=part)
        return httpx2.Response(200, headers=headers, content=data)


@pytest.fixture
def fake_hub() -> FakeHub:
    """Route every huggingface_hub HTTP request to a FakeHub for the duration of the test."""
    hub = FakeHub()
    hf_http.close_session()
    hfh.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(hub.handler)))
    yield hub
    hf_http.close_session()
    hfh.set_client_factory(hf_http.default_client_factory)


# --------------------------------------------------------------------------- local paths


def test_local_folder_opens(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "model", single_files())
    ckpt = open_model(str(folder))
    assert ckpt.name == str(folder)
    assert ckpt.root == folder and ckpt.revision is None
    gate = ckpt.tensors["model.layers.0.block_sparse_moe.gate.weight"]
    assert (gate.dtype, gate.shape) == ("F32", (2, 4))
    assert ckpt.tensors["model.layers.0.block_sparse_moe.experts.1.w1.weight"].dtype == "F16"


def test_local_folder_never_touches_the_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("the Hub was asked about a local folder")

    monkeypatch.setattr(hfh, "snapshot_download", boom)
    monkeypatch.setattr(hfh.HfApi, "get_safetensors_metadata", boom)
    folder = write_folder(tmp_path / "model", single_files())
    assert open_model(str(folder), need_weights=False).has_weights


def test_hf_cache_snapshot_folder_records_its_commit(tmp_path: Path) -> None:
    snapshot = write_folder(tmp_path / "models--org--tiny-moe" / "snapshots" / SHA, single_files())
    ckpt = open_model(str(snapshot))
    assert ckpt.revision == SHA
    assert parse_model_ref(str(snapshot)) == ModelRef(str(snapshot), snapshot, None, SHA)


def test_file_is_refused(tmp_path: Path) -> None:
    path = write_folder(tmp_path / "model", single_files()) / "model.safetensors"
    with pytest.raises(SourceNotFoundError) as info:
        open_model(str(path))
    assert info.value.code == "NOT_A_FOLDER"
    assert "config.json" in info.value.hint


@pytest.mark.parametrize("spec", ["./missing", "{tmp}/abs/missing", "a/b/c", "../up/model", "bad--name", ".hidden"])
def test_missing_path_is_refused_without_asking_the_hub(
    spec: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hfh, "snapshot_download", lambda *a, **k: pytest.fail("asked the Hub"))
    spec = spec.format(tmp=tmp_path)
    with pytest.raises(SourceNotFoundError) as info:
        open_model(spec)
    assert info.value.code == "SOURCE_NOT_FOUND"
    assert info.value.message == f"no such folder: {spec}"
    assert info.value.hint


def test_revision_with_local_path_is_a_usage_error(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "model", single_files())
    with pytest.raises(UsageError) as info:
        open_model(str(folder), revision="main")
    assert info.value.exit_code == EXIT_USAGE


def test_empty_spec_is_a_usage_error() -> None:
    with pytest.raises(UsageError):
        open_model("")


def test_existing_relative_path_wins_over_repo_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # "org/tiny-moe" is a valid repo id, but a folder of that name exists here: A1 says local first.
    monkeypatch.chdir(tmp_path)
    write_folder(tmp_path / "org" / "tiny-moe", single_files())
    monkeypatch.setattr(hfh, "snapshot_download", lambda *a, **k: pytest.fail("asked the Hub"))
    assert not looks_like_repo_id(REPO)
    assert open_model(REPO).root == Path(REPO)


@pytest.mark.parametrize(
    "spec",
    [
        "gpt2",
        "org/name",
        "Qwen/Qwen3-30B-A3B",
        "mistralai/Mixtral-8x7B-v0.1",
        "a.b_c-d/e.f",
        "org/name.git",
        "org--x/name",
        "org/na..me",
        "-org/name",
        "org/name-",
        ".org/name",
        "org/",
        "/name",
        "a/b/c",
        "café/x",
        "x" * 96,
        "x" * 97,
        "org/" + "y" * 96,
        "org name/x",
        "org/na~me",
    ],
)
def test_looks_like_repo_id_agrees_with_huggingface_hub(spec: str) -> None:
    try:
        validate_repo_id(spec)
        valid = True
    except hf_errors.HFValidationError:
        valid = False
    assert looks_like_repo_id(spec) is valid


# --------------------------------------------------------------------------- Hub, monkeypatched


class Recorder:
    """Stands in for snapshot_download: writes ``files`` matching allow_patterns into a fake cache."""

    def __init__(self, cache: Path, files: dict[str, bytes], sha: str = SHA) -> None:
        self.cache, self.files, self.sha = cache, files, sha
        self.calls: list[dict] = []

    def __call__(self, repo_id: str, **kwargs: object) -> str:
        import fnmatch

        self.calls.append(kwargs)
        folder = self.cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / self.sha
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in self.files.items():
            if any(fnmatch.fnmatch(name, p) for p in kwargs["allow_patterns"]):
                (folder / name).write_bytes(data)
        return str(folder)


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_hub_inspect_reads_headers_remotely(layout: str, hub_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = single_files() if layout == "single" else sharded_files(2)
    download = Recorder(hub_env, files)
    asked: list[dict] = []

    def get_safetensors_metadata(self: object, repo_id: str, **kwargs: object) -> SafetensorsRepoMetadata:
        asked.append({"repo_id": repo_id, **kwargs})
        return hub_metadata(files)

    monkeypatch.setattr(hfh, "snapshot_download", download)
    monkeypatch.setattr(hfh, "hf_hub_download", lambda *a, **k: pytest.fail("hf_hub_download called"))
    monkeypatch.setattr(hfh.HfApi, "get_safetensors_metadata", get_safetensors_metadata)
    monkeypatch.setattr(hfh.HfApi, "list_repo_files", lambda *a, **k: list(files))

    ckpt = open_model(REPO, need_weights=False, token="hf_secret")

    assert ckpt.name == REPO and ckpt.revision == SHA and ckpt.root is None
    expected = {n: (a.dtype, a.shape) for k in range(2 if layout == "sharded" else 1) for n, a in tensors_of(k).items()}
    got = {n: (t.dtype, t.shape) for n, t in ckpt.tensors.items()}
    np_to_st = {np.dtype("float32"): "F32", np.dtype("float16"): "F16"}
    assert got == {n: (np_to_st[d], s) for n, (d, s) in expected.items()}
    assert ckpt.total_bytes() == sum(
        a.nbytes for k in range(2 if layout == "sharded" else 1) for a in tensors_of(k).values()
    )
    if layout == "sharded":
        assert ckpt.shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        assert ckpt.index_metadata["total_size"] == ckpt.total_bytes()
    # Headers were asked for at the resolved commit, with the caller's token.
    assert asked == [{"repo_id": REPO, "revision": SHA, "token": "hf_secret"}]
    # Only small files were downloaded: no pattern can match a weight file.
    for call in download.calls:
        assert call["token"] == "hf_secret"
        for name in files:
            if name.endswith(".safetensors"):
                assert not any(
                    re.fullmatch(p.replace(".", r"\.").replace("*", ".*"), name) for p in call["allow_patterns"]
                )
    assert not list(hub_env.rglob("*.safetensors"))


def test_hub_config_missing(hub_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hfh, "snapshot_download", Recorder(hub_env, {"model.safetensors": st_bytes()}))
    with pytest.raises(ConfigError) as info:
        open_model(REPO, need_weights=False)
    assert info.value.code == "CONFIG_MISSING"
    assert REPO in info.value.message


def connect_error() -> Exception:
    return httpx2.ConnectError("[Errno 111] Connection refused")


def local_miss_after(cause: Exception) -> Exception:
    try:
        raise hf_errors.LocalEntryNotFoundError("Cannot find the requested files in the disk cache") from cause
    except hf_errors.LocalEntryNotFoundError as exc:
        return exc


@pytest.mark.parametrize(
    ("make", "cls", "code"),
    [
        (lambda: hub_error(401, "RepoNotFound"), SourceNotFoundError, "REPO_NOT_FOUND"),
        (lambda: hub_error(404, "RepoNotFound"), SourceNotFoundError, "REPO_NOT_FOUND"),
        (lambda: hub_error(403, "GatedRepo"), SourceNotFoundError, "GATED_REPO"),
        (lambda: hub_error(404, "RevisionNotFound"), SourceNotFoundError, "REVISION_NOT_FOUND"),
        (
            lambda: hub_error(403, message="Access to this resource is disabled."),
            SourceNotFoundError,
            "REPO_DISABLED",
        ),
        (
            lambda: hub_error(401, message="Invalid credentials in Authorization header"),
            SourceNotFoundError,
            "AUTH_FAILED",
        ),
        (lambda: hub_error(500), SourceNotFoundError, "HUB_UNREACHABLE"),
        (lambda: hub_error(429), SourceNotFoundError, "HUB_UNREACHABLE"),
        (connect_error, SourceNotFoundError, "HUB_UNREACHABLE"),
        (lambda: local_miss_after(connect_error()), SourceNotFoundError, "HUB_UNREACHABLE"),
        (
            lambda: local_miss_after(hf_errors.OfflineModeIsEnabled("offline")),
            SourceNotFoundError,
            "OFFLINE_NOT_CACHED",
        ),
        (lambda: hf_errors.OfflineModeIsEnabled("offline"), SourceNotFoundError, "OFFLINE_NOT_CACHED"),
        (lambda: hf_errors.LocalTokenNotFoundError("no token"), UsageError, "TOKEN_MISSING"),
    ],
)
@pytest.mark.parametrize("need_weights", [True, False])
def test_hub_errors_map_to_one_line_codes(
    make, cls: type[MoetoolError], code: str, need_weights: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    exc = make()

    def fail(*args: object, **kwargs: object) -> None:
        raise exc

    monkeypatch.setattr(hfh, "snapshot_download", fail)
    with pytest.raises(cls) as info:
        open_model(REPO, need_weights=need_weights)
    assert info.value.code == code
    assert_one_line(info.value)


def test_gated_hint_names_the_model_page(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hfh, "snapshot_download", lambda *a, **k: (_ for _ in ()).throw(hub_error(403, "GatedRepo")))
    with pytest.raises(SourceNotFoundError) as info:
        open_model(REPO)
    assert f"https://huggingface.co/{REPO}" in info.value.hint and "HF_TOKEN" in info.value.hint


def test_offline_cache_miss_maps_to_offline_not_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    miss = hf_errors.LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder")
    monkeypatch.setattr(hfh, "snapshot_download", lambda *a, **k: (_ for _ in ()).throw(miss))
    with pytest.raises(SourceNotFoundError) as info:
        open_model(REPO, offline=True)
    assert info.value.code == "OFFLINE_NOT_CACHED"
    assert "HF_HUB_OFFLINE" in info.value.hint
    assert_one_line(info.value)


def test_safetensors_parsing_error_is_a_checkpoint_error(hub_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hfh, "snapshot_download", Recorder(hub_env, single_files()))

    def bad(*args: object, **kwargs: object) -> None:
        raise hf_errors.SafetensorsParsingError("Failed to parse safetensors header for 'model.safetensors'")

    monkeypatch.setattr(hfh.HfApi, "get_safetensors_metadata", bad)
    with pytest.raises(CheckpointError) as info:
        open_model(REPO, need_weights=False)
    assert_one_line(info.value)


def test_remote_header_is_validated_like_a_local_one(hub_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hfh, "snapshot_download", Recorder(hub_env, single_files()))
    meta = hub_metadata(single_files())
    info = next(iter(meta.files_metadata["model.safetensors"].tensors.values()))
    info.data_offsets = (0, 7)  # shape x dtype says 32 bytes
    monkeypatch.setattr(hfh.HfApi, "get_safetensors_metadata", lambda *a, **k: meta)
    with pytest.raises(CheckpointError) as err:
        open_model(REPO, need_weights=False)
    assert err.value.code in {"INVALID_OFFSET", "TENSOR_INVALID_INFO"}


# --------------------------------------------------------------------------- Hub, through the fake


def test_fake_hub_inspect_reads_no_weights(fake_hub: FakeHub, hub_env: Path) -> None:
    fake_hub.add(REPO, {**single_files(), "README.md": b"# tiny"})
    ckpt = open_model(REPO, need_weights=False)
    assert ckpt.revision == SHA and ckpt.root is None
    assert set(ckpt.tensors) == set(tensors_of(0))
    assert fake_hub.downloads() == ["config.json"]  # the only file fetched in full
    assert set(fake_hub.ranged()) == {"model.safetensors"}  # its header, by range request
    repo_dir = hub_env / "models--org--tiny-moe"
    assert (repo_dir / "refs" / "main").read_text() == SHA  # so that a later offline run finds it
    assert not list(hub_env.rglob("*.safetensors"))


def test_fake_hub_sharded_download_fetches_exactly_the_index_shards(fake_hub: FakeHub, hub_env: Path) -> None:
    files = {
        **sharded_files(2),
        # Duplicates and pickles real repos carry next to the HF shards: never downloaded.
        "consolidated.safetensors": st_bytes(7),
        "original/model.safetensors": st_bytes(8),
        "pytorch_model.bin": b"\x80\x04pickle",
        "tokenizer.json": b"{}",
    }
    fake_hub.add(REPO, files)
    ckpt = open_model(REPO, need_weights=True)
    assert ckpt.revision == SHA
    assert ckpt.root == hub_env / "models--org--tiny-moe" / "snapshots" / SHA  # used in place, not copied
    assert ckpt.shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert sorted(fake_hub.downloads()) == sorted(
        [
            "config.json",
            "model.safetensors.index.json",
            "tokenizer.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
        ]
    )
    assert (ckpt.root / "tokenizer.json").exists()


def test_fake_hub_single_file_download(fake_hub: FakeHub, hub_env: Path) -> None:
    fake_hub.add(REPO, {**single_files(), "consolidated.safetensors": st_bytes(7)})
    ckpt = open_model(REPO)
    assert ckpt.shards == ["model.safetensors"] and ckpt.root is not None
    assert "consolidated.safetensors" not in fake_hub.downloads()


@pytest.mark.parametrize(("revision", "sha"), [("dev", SHA_DEV), ("refs/pr/1", SHA_PR), (SHA_DEV, SHA_DEV)])
def test_fake_hub_revision_is_recorded_as_full_sha(revision: str, sha: str, fake_hub: FakeHub, hub_env: Path) -> None:
    repo = fake_hub.add(REPO, single_files())
    repo.refs.update({"dev": SHA_DEV, "refs/pr/1": SHA_PR})
    repo.commits.update({SHA_DEV: single_files(), SHA_PR: single_files()})
    assert open_model(REPO, revision=revision, need_weights=False).revision == sha
    assert open_model(REPO, revision=revision, need_weights=True).revision == sha


def test_fake_hub_then_offline_reuses_the_cache(
    fake_hub: FakeHub, hub_env: Path, no_network: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_hub.add(REPO, sharded_files(2))
    open_model(REPO, need_weights=False)  # caches config.json and the index only
    fake_hub.status = 500  # from here on any request would fail loudly
    go_offline(monkeypatch)
    seen = len(fake_hub.requests)

    ckpt = open_model(REPO, need_weights=False)
    assert ckpt.revision == SHA and ckpt.config == CONFIG and not ckpt.tensors
    assert any("offline" in w for w in ckpt.warnings)
    with pytest.raises(SourceNotFoundError) as info:  # the weights were never downloaded
        open_model(REPO, need_weights=True)
    assert info.value.code == "OFFLINE_NOT_CACHED"
    assert len(fake_hub.requests) == seen and no_network == []


def test_fake_hub_full_download_then_offline_inspect_reads_cached_headers(
    fake_hub: FakeHub, hub_env: Path, no_network: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_hub.add(REPO, sharded_files(2))
    open_model(REPO, need_weights=True)
    fake_hub.status = 500
    seen = len(fake_hub.requests)
    for offline_kwarg in (True, None):
        if offline_kwarg is None:
            go_offline(monkeypatch)
        ckpt = open_model(REPO, need_weights=False, offline=offline_kwarg)
        assert ckpt.revision == SHA and ckpt.root is not None and len(ckpt.tensors) == 6
        assert open_model(REPO, need_weights=True, offline=offline_kwarg).shards == ckpt.shards
    assert len(fake_hub.requests) == seen and no_network == []


def test_fake_hub_incomplete_offline_snapshot(
    fake_hub: FakeHub, hub_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_hub.add(REPO, sharded_files(2))
    ckpt = open_model(REPO, need_weights=True)
    (ckpt.root / "model-00002-of-00002.safetensors").unlink()  # B12: one shard gone from the cache
    go_offline(monkeypatch)
    with pytest.raises(SourceNotFoundError) as info:
        open_model(REPO, need_weights=True)
    assert info.value.code == "OFFLINE_NOT_CACHED"
    assert "incomplete" in info.value.message and "model-00002-of-00002.safetensors" in info.value.message
    # inspect still works offline, from config.json alone
    partial = open_model(REPO, need_weights=False)
    assert partial.revision == SHA and any("1 of 2" in w for w in partial.warnings)


@pytest.mark.parametrize(
    ("setup", "spec", "revision", "code"),
    [
        (None, "org/unknown", None, "REPO_NOT_FOUND"),
        ("gated", REPO, None, "GATED_REPO"),
        ("ok", REPO, "no-such-branch", "REVISION_NOT_FOUND"),
        ("down", REPO, None, "HUB_UNREACHABLE"),
    ],
)
@pytest.mark.parametrize("need_weights", [True, False])
def test_fake_hub_errors(
    setup: str | None, spec: str, revision: str | None, code: str, need_weights: bool, fake_hub: FakeHub
) -> None:
    if setup in ("ok", "down"):
        fake_hub.add(REPO, single_files())
    if setup == "gated":
        fake_hub.add(REPO, single_files(), gated=True)
    if setup == "down":
        fake_hub.status = 503
    with pytest.raises(SourceNotFoundError) as info:
        open_model(spec, revision=revision, need_weights=need_weights)
    assert info.value.code == code
    assert_one_line(info.value)


def test_unusable_cache_dir(fake_hub: FakeHub, tmp_path: Path) -> None:
    fake_hub.add(REPO, single_files())
    not_a_folder = tmp_path / "cache-file"
    not_a_folder.write_text("")
    with pytest.raises(MoetoolError) as info:
        open_model(REPO, cache_dir=not_a_folder)
    assert info.value.code == "CACHE_UNUSABLE"
    assert_one_line(info.value)


def test_cache_dir_argument_is_used(fake_hub: FakeHub, hub_env: Path, tmp_path: Path) -> None:
    fake_hub.add(REPO, single_files())
    ckpt = open_model(REPO, cache_dir=tmp_path / "elsewhere")
    assert ckpt.root == tmp_path / "elsewhere" / "models--org--tiny-moe" / "snapshots" / SHA
    assert not hub_env.exists()


def test_plain_name_not_found_mentions_the_local_folder(fake_hub: FakeHub) -> None:
    with pytest.raises(SourceNotFoundError) as info:
        open_model("tiny-moe")
    assert info.value.code == "REPO_NOT_FOUND"
    assert "no local folder 'tiny-moe'" in info.value.message


def test_fake_hub_missing_config(fake_hub: FakeHub) -> None:
    fake_hub.add(REPO, {"model.safetensors": st_bytes()})
    for need_weights in (True, False):
        with pytest.raises(ConfigError) as info:
            open_model(REPO, need_weights=need_weights)
        assert info.value.code == "CONFIG_MISSING"


def test_fake_hub_pickle_only_repo(fake_hub: FakeHub) -> None:
    fake_hub.add(REPO, {"config.json": json.dumps(CONFIG).encode(), "pytorch_model.bin": b"\x80\x04pickle"})
    ckpt = open_model(REPO, need_weights=False)
    assert ckpt.config == CONFIG and not ckpt.tensors
    assert any("pickle" in w for w in ckpt.warnings)
    with pytest.raises(PickleRefusedError):
        open_model(REPO, need_weights=True)
    assert "pytorch_model.bin" not in fake_hub.downloads()


def test_fake_hub_config_only_repo(fake_hub: FakeHub) -> None:
    fake_hub.add(REPO, {"config.json": json.dumps(CONFIG).encode()})
    ckpt = open_model(REPO, need_weights=False)
    assert ckpt.config == CONFIG and not ckpt.tensors and ckpt.warnings


@pytest.mark.parametrize("how", ["argument", "HF_TOKEN"])
def test_token_reaches_the_hub(how: str, fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_hub.add(REPO, single_files())
    if how == "HF_TOKEN":
        monkeypatch.setenv("HF_TOKEN", "hf_from_env")
        open_model(REPO, need_weights=False)
        expected = "Bearer hf_from_env"
    else:
        open_model(REPO, need_weights=False, token="hf_from_arg")
        expected = "Bearer hf_from_arg"
    assert fake_hub.requests and all(r.authorization == expected for r in fake_hub.requests)


# --------------------------------------------------------------------------- offline, nothing cached (B31)


@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("how", ["env", "argument"])
def test_offline_with_empty_cache(
    how: str, need_weights: bool, hub_env: Path, no_network: list, monkeypatch: pytest.MonkeyPatch
) -> None:
    if how == "env":
        go_offline(monkeypatch)
    with pytest.raises(SourceNotFoundError) as info:
        open_model(REPO, need_weights=need_weights, offline=True if how == "argument" else None)
    assert info.value.code == "OFFLINE_NOT_CACHED"
    assert_one_line(info.value)
    assert no_network == []


def test_offline_env_set_after_import_is_still_honoured(no_network: list, monkeypatch: pytest.MonkeyPatch) -> None:
    # huggingface_hub read HF_HUB_OFFLINE at import; a later export must still keep us off the network.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceNotFoundError) as info:
        open_model(REPO, need_weights=False)
    assert info.value.code == "OFFLINE_NOT_CACHED"
    assert no_network == []


# --------------------------------------------------------------------------- progress bars, imports


def test_hub_disable_progress_bars() -> None:
    hub_disable_progress_bars()
    assert hf_tqdm.are_progress_bars_disabled()
    assert hf_tqdm.are_progress_bars_disabled("huggingface_hub.snapshot_download")


def test_hub_disable_progress_bars_respects_an_explicit_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "0")
    hf_tqdm.enable_progress_bars()
    hub_disable_progress_bars()  # no warning, no change: the user asked for bars
    assert not hf_tqdm.are_progress_bars_disabled()


def test_import_and_local_open_stay_light(tmp_path: Path) -> None:
    folder = write_folder(tmp_path / "model", single_files())
    code = textwrap.dedent(
        f"""
        import sys
        import moetool.io.source as s
        heavy = [m for m in ("torch", "transformers", "huggingface_hub", "httpx2") if m in sys.modules]
        assert not heavy, f"import loaded {{heavy}}"
        s.open_model({str(folder)!r}, need_weights=False)
        heavy = [m for m in ("torch", "transformers", "huggingface_hub") if m in sys.modules]
        assert not heavy, f"opening a local folder loaded {{heavy}}"
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_module_exports() -> None:
    assert {"open_model", "looks_like_repo_id", "hub_disable_progress_bars", "ModelRef"} <= set(dir(source))
