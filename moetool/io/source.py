"""Resolve what the user typed as ``MODEL`` into a :class:`~moetool.io.checkpoint.Checkpoint`.

``MODEL`` is a local folder (a plain ``save_pretrained`` folder or a Hugging Face cache snapshot) when
that path exists, otherwise a Hub repo id. Hub access goes through ``huggingface_hub`` only, so its
cache (``HF_HOME`` / ``HF_HUB_CACHE``), offline mode (``HF_HUB_OFFLINE``) and token resolution
(``HF_TOKEN``, ``hf auth login``) behave as in every other Hugging Face tool; the cache is used in
place, never copied. Every Hub failure becomes one :class:`~moetool.errors.MoetoolError` line.

Nothing here imports torch, and ``huggingface_hub`` (slow to import) is imported only when a Hub repo
is actually resolved: ``moetool inspect ./folder`` never loads it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moetool.errors import (
    CheckpointError,
    ConfigError,
    MoetoolError,
    PickleRefusedError,
    SourceNotFoundError,
    UsageError,
    first_line,
)
from moetool.io.names import CONFIG_NAME, INDEX_NAME, PICKLE_SUFFIXES, SINGLE_FILE_NAME

if TYPE_CHECKING:
    from moetool.io.checkpoint import Checkpoint
    from moetool.io.safetensors_header import SafetensorsHeader


#: What ``inspect`` needs from a repo besides the shard headers (which are read remotely).
METADATA_PATTERNS: tuple[str, ...] = (CONFIG_NAME, "*.safetensors.index.json", "generation_config.json")

#: Small files that commands writing a new checkpoint copy next to the weights. Weight files are not
#: listed here: they are chosen by name from the index (see :func:`_weight_files`), so that duplicate
#: copies some repos carry (``consolidated*.safetensors``, ``original/``) are never downloaded.
TOKENIZER_PATTERNS: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.model",
    "*.tiktoken",
    "chat_template*",
)

# Mirrors huggingface_hub.utils.validate_repo_id (REPO_ID_REGEX and its extra rules), copied so that
# classifying a local path never imports huggingface_hub; tests check both agree.
_REPO_ID_RE = re.compile(r"(\b[\w\-.]{1,96}\b/)?\b[\w\-.]{1,96}\b", re.ASCII)
_COMMIT_RE = re.compile(r"[0-9a-f]{40}")
_HF_MODEL_DIR = re.compile(r"^models--.+")

HINT_LOGIN = "check the repo id; for a private or gated repo log in with `hf auth login` or set HF_TOKEN"
HINT_GATED = "accept the terms on the model page (https://huggingface.co/REPO) and set HF_TOKEN or run `hf auth login`"
HINT_OFFLINE = "run the command once online to fill the cache, or unset HF_HUB_OFFLINE"
HINT_UNREACHABLE = "check your network connection and https://status.huggingface.co, then retry"


@dataclass(frozen=True)
class ModelRef:
    """What the user typed as ``MODEL``, classified.

    Attributes:
        spec: the text as typed.
        local_path: the folder, when ``spec`` is an existing local folder.
        repo_id: the Hub repo id, when ``spec`` is not a local path.
        revision: the revision as requested; for a Hugging Face cache snapshot folder, the commit sha
            taken from its name.
    """

    spec: str
    local_path: Path | None
    repo_id: str | None
    revision: str | None


def looks_like_repo_id(spec: str) -> bool:
    """Whether ``spec`` can be a Hub repo id and is not an existing local path.

    The rules are huggingface_hub's ``validate_repo_id``: ``name`` or ``namespace/name``, 1-96
    characters of ``[A-Za-z0-9_.-]`` each, not starting or ending with ``-`` or ``.``, no ``--`` or
    ``..``, not ending in ``.git``.

    Args:
        spec: what the user typed.

    Returns:
        True when it would be sent to the Hub.
    """
    if not spec or os.path.lexists(os.path.expanduser(spec)):
        return False
    return (
        spec.count("/") <= 1
        and _REPO_ID_RE.fullmatch(spec) is not None
        and "--" not in spec
        and ".." not in spec
        and not spec.endswith(".git")
    )


def _snapshot_commit(folder: Path) -> str | None:
    """The commit sha of a Hugging Face cache snapshot folder (``models--o--n/snapshots/<sha>``)."""
    folder = folder.resolve()
    if (
        _COMMIT_RE.fullmatch(folder.name)
        and folder.parent.name == "snapshots"
        and _HF_MODEL_DIR.match(folder.parent.parent.name)
    ):
        return folder.name
    return None


def parse_model_ref(spec: str, *, revision: str | None = None) -> ModelRef:
    """Classify ``spec`` as a local folder or a Hub repo id, without any network access.

    Args:
        spec: what the user typed as ``MODEL``.
        revision: the ``--revision`` option, if given.

    Returns:
        The classified reference.

    Raises:
        UsageError: an empty ``spec``, or ``--revision`` given with a local path.
        SourceNotFoundError: ``NOT_A_FOLDER`` for an existing file, ``SOURCE_NOT_FOUND`` for a path that
            does not exist and cannot be a repo id.
    """
    if not spec:
        # Path("") is the current directory: never read that by accident.
        raise UsageError("MODEL is empty", hint="pass a local model folder or a Hub repo id such as org/name")
    path = Path(spec).expanduser()
    if path.exists():
        if revision is not None:
            raise UsageError(
                f"--revision {revision} cannot be used with the local path {spec}",
                hint="--revision selects a Hub revision; drop it, or pass a repo id instead of a folder",
            )
        if not path.is_dir():
            raise SourceNotFoundError(
                f"{spec} is a file, not a model folder",
                hint="pass the folder that holds config.json and the *.safetensors files",
                code="NOT_A_FOLDER",
            )
        return ModelRef(spec=spec, local_path=path, repo_id=None, revision=_snapshot_commit(path))
    if not looks_like_repo_id(spec):
        raise SourceNotFoundError(
            f"no such folder: {spec}",
            hint="check the path; a Hub repo id has the form org/name",
            code="SOURCE_NOT_FOUND",
        )
    return ModelRef(spec=spec, local_path=None, repo_id=spec, revision=revision)


def hub_disable_progress_bars() -> None:
    """Turn off huggingface_hub's own tqdm progress bars, so that they cannot mix with our output.

    An explicit ``HF_HUB_DISABLE_PROGRESS_BARS`` in the environment is the user's choice and wins
    (huggingface_hub would only warn if we tried to override it).
    """
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") is not None:
        return
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()


def _env_offline() -> bool:
    # huggingface_hub reads HF_HUB_OFFLINE once, at its import; the environment is read again here so
    # that a later change (tests, a wrapping program) still keeps us from the network.
    from huggingface_hub import constants

    def true(name: str) -> bool:
        return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}

    return constants.is_offline_mode() or true("HF_HUB_OFFLINE") or true("TRANSFORMERS_OFFLINE")


def _status(exc: Any) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _at(revision: str | None) -> str:
    return f" at revision {revision}" if revision else ""


@contextlib.contextmanager
def _hub_errors(repo_id: str, revision: str | None, *, offline: bool) -> Iterator[None]:
    """Translate huggingface_hub exceptions into one-line MoetoolErrors (no traceback for the user)."""
    import httpx2
    from huggingface_hub import errors as hf

    try:
        yield
    except MoetoolError:
        raise
    # Order matters: the hub's classes inherit from each other (GatedRepoError is a
    # RepositoryNotFoundError, IncompleteSnapshotError a LocalEntryNotFoundError, all HTTP ones
    # HfHubHTTPError).
    except hf.GatedRepoError:
        raise SourceNotFoundError(
            f"{repo_id} is a gated repository and this token has no access to it",
            hint=HINT_GATED.replace("REPO", repo_id),
            code="GATED_REPO",
        ) from None
    except hf.RepositoryNotFoundError:
        # A plain name may also be a mistyped local folder: say both, since both were tried.
        where = "" if "/" in repo_id else f"no local folder {repo_id!r} and "
        raise SourceNotFoundError(
            f"{where}no Hub repository {repo_id!r} (or it is private)",
            hint=HINT_LOGIN,
            code="REPO_NOT_FOUND",
        ) from None
    except hf.DisabledRepoError:
        raise SourceNotFoundError(
            f"{repo_id} has been disabled on the Hub", hint="use another repository", code="REPO_DISABLED"
        ) from None
    except hf.RevisionNotFoundError:
        raise SourceNotFoundError(
            f"{repo_id} has no revision {revision or 'main'!r}",
            hint="pass a branch, tag, commit sha or refs/pr/N that exists (hf repo-files / the model page)",
            code="REVISION_NOT_FOUND",
        ) from None
    except hf.RemoteEntryNotFoundError as exc:
        raise SourceNotFoundError(
            f"{repo_id}{_at(revision)}: a file is missing on the Hub ({first_line(exc)})",
            hint="check the repository's files on its model page",
            code="FILE_NOT_FOUND",
        ) from None
    except hf.IncompleteSnapshotError as exc:
        found = re.search(r"\d+ file\(s\) are missing \([^)]*\)", str(exc))
        detail = found.group(0) if found else "some files are missing"
        why = "offline mode" if offline else "the Hub cannot be reached"
        raise SourceNotFoundError(
            f"{why}, and the cached copy of {repo_id}{_at(revision)} is incomplete: {detail}",
            hint=HINT_OFFLINE,
            code="OFFLINE_NOT_CACHED",
        ) from None
    except (hf.LocalEntryNotFoundError, hf.OfflineModeIsEnabled, hf.RevisionResolutionError) as exc:
        cause = exc.__cause__ or exc.__context__
        if (
            not offline
            and cause is not None
            and not isinstance(exc, hf.OfflineModeIsEnabled)
            and not isinstance(cause, hf.OfflineModeIsEnabled)
        ):
            # Online, but the Hub did not answer and the cache could not stand in for it.
            raise SourceNotFoundError(
                f"cannot reach the Hub for {repo_id} ({first_line(cause)}), and it is not in the cache",
                hint=HINT_UNREACHABLE,
                code="HUB_UNREACHABLE",
            ) from None
        raise SourceNotFoundError(
            f"offline mode: {repo_id}{_at(revision)} is not in the Hugging Face cache",
            hint=HINT_OFFLINE,
            code="OFFLINE_NOT_CACHED",
        ) from None
    except hf.HfHubHTTPError as exc:
        status = _status(exc)
        if status in (401, 403):
            raise SourceNotFoundError(
                f"the Hub refused access to {repo_id} (HTTP {status}): {first_line(exc)}",
                hint="check HF_TOKEN or run `hf auth login` again (the token is invalid or lacks rights)",
                code="AUTH_FAILED",
            ) from None
        raise SourceNotFoundError(
            f"the Hub answered HTTP {status} for {repo_id}: {first_line(exc)}",
            hint=HINT_UNREACHABLE,
            code="HUB_UNREACHABLE",
        ) from None
    except (httpx2.TransportError, ConnectionError, TimeoutError) as exc:
        raise SourceNotFoundError(
            f"cannot reach the Hub for {repo_id}: {type(exc).__name__}: {first_line(exc)}",
            hint=HINT_UNREACHABLE,
            code="HUB_UNREACHABLE",
        ) from None
    except hf.LocalTokenNotFoundError:
        raise UsageError(
            "a Hub token was requested but none is saved",
            hint="run `hf auth login` or set HF_TOKEN",
            code="TOKEN_MISSING",
        ) from None
    except hf.SafetensorsParsingError as exc:
        raise CheckpointError(
            f"{repo_id}{_at(revision)}: a safetensors header on the Hub is invalid ({first_line(exc)})",
            hint="report it to the repository owner; moetool cannot read this checkpoint",
            code="HEADER_INVALID_JSON",
        ) from None
    except hf.HFValidationError as exc:
        raise UsageError(f"{repo_id!r} is not a valid Hub repo id: {first_line(exc)}") from None
    except OSError as exc:
        # Last: the Hub's own errors above are OSErrors too. What is left is the local cache failing
        # (read-only folder, disk full, a file where a folder should be).
        where = f" ({exc.filename})" if exc.filename else ""
        raise MoetoolError(
            f"cannot use the Hugging Face cache for {repo_id}: {exc.strerror or first_line(exc)}{where}",
            hint="check that HF_HUB_CACHE / HF_HOME (or --cache-dir) is a writable folder with free space",
            code="CACHE_UNUSABLE",
        ) from None


def _index_shards(index: Any, what: str) -> list[str]:
    """The shard names an index lists, checked to be plain relative names (full checks: Checkpoint)."""
    from moetool.io.checkpoint import check_relative_name

    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(
            f"{what} has no valid weight_map", hint="fix or re-download the index file", code="INDEX_INVALID"
        )
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        check_relative_name(shard)  # before a name becomes a download pattern
    return shards


def _weight_files(folder: Path, index: dict[str, Any] | None, listing: list[str] | None) -> list[str] | None:
    """Names of the safetensors files that make up the checkpoint, or None when unknown.

    With an index, exactly the shards it lists; without one, ``model.safetensors``, else every root
    ``*.safetensors`` of the repo (the same choice :meth:`Checkpoint.open` makes for a folder). Without
    a file list, whatever safetensors files the cached snapshot holds.
    """
    if index is not None:
        return _index_shards(index, f"{INDEX_NAME} in {folder}")
    if listing is None:
        # No file list (offline, no cached tree listing): go by what the cached snapshot holds.
        if (folder / SINGLE_FILE_NAME).is_file():
            return [SINGLE_FILE_NAME]
        local = sorted(p.name for p in folder.glob("*.safetensors") if not p.name.startswith("."))
        return local or None
    if SINGLE_FILE_NAME in listing:
        return [SINGLE_FILE_NAME]
    return sorted(f for f in listing if "/" not in f and f.endswith(".safetensors") and not f.startswith("."))


def _pickle_weights(listing: list[str] | None) -> list[str]:
    return sorted(f for f in listing or [] if "/" not in f and f.lower().endswith(PICKLE_SUFFIXES))


def _header_from_hub(filename: str, meta: Any) -> SafetensorsHeader:
    """Turn huggingface_hub's ``SafetensorsFileMetadata`` into our validated SafetensorsHeader.

    The hub's parsed header is written back as header JSON and goes through :func:`parse_header`,
    so remote headers get the same checks as local ones (dtype, shape x dtype = byte range,
    contiguous offsets). ``header_len`` is then the length of that re-serialised JSON, not of the
    remote file's header (which the hub does not report); no data is ever read at that offset,
    since a remote checkpoint has no local file.
    """
    import json

    from moetool.io.safetensors_header import parse_header

    doc: dict[str, Any] = {}
    if meta.metadata:
        doc["__metadata__"] = meta.metadata
    for name, info in meta.tensors.items():
        doc[name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": list(info.data_offsets)}
    return parse_header(json.dumps(doc).encode("utf-8"), file=filename, data_size=None)


def _read_index(folder: Path) -> dict[str, Any] | None:
    from moetool.io.jsonfile import load_json_file

    path = folder / INDEX_NAME
    if not path.exists():
        return None
    return load_json_file(
        path,
        what=f"{INDEX_NAME} in {folder}",
        error=CheckpointError,
        hint="fix or re-download the index file",
    )


def _open_hub(
    repo_id: str,
    *,
    revision: str | None,
    token: str | bool | None,
    cache_dir: Path | None,
    offline: bool,
    need_weights: bool,
) -> Checkpoint:
    """Open a Hub repo through the huggingface_hub cache (see :func:`open_model`)."""
    import huggingface_hub as hfh
    from huggingface_hub.errors import IncompleteSnapshotError

    hub_disable_progress_bars()
    hub = _Hub(
        api=hfh.HfApi(token=token),
        repo_id=repo_id,
        token=token,
        cache_dir=str(cache_dir) if cache_dir is not None else None,
        offline=offline,
    )
    with _hub_errors(repo_id, revision, offline=offline):
        # Step 1: the small files. snapshot_download resolves the revision once (and records it under
        # refs/, so that a later offline run finds it) and returns .../snapshots/<commit sha>.
        patterns = list(METADATA_PATTERNS) + (list(TOKENIZER_PATTERNS) if need_weights else [])
        try:
            folder = hub.snapshot(revision, patterns)
        except IncompleteSnapshotError as exc:
            # Offline inspect can live with a cached snapshot that misses some small file, as long as
            # config.json is there; commands that write checkpoints cannot.
            if need_weights or not (Path(exc.snapshot_path) / CONFIG_NAME).exists():
                raise
            folder = Path(exc.snapshot_path)
        sha = folder.name if _COMMIT_RE.fullmatch(folder.name) else revision
        if not (folder / CONFIG_NAME).exists():
            raise ConfigError(
                f"{repo_id}{_at(sha)} has no {CONFIG_NAME}",
                hint="moetool needs a transformers-format repository (config.json + safetensors)",
                code="CONFIG_MISSING",
            )
        if need_weights:
            return _open_hub_weights(hub, folder, sha, patterns)
        return _open_hub_headers(hub, folder, sha)


@dataclass(frozen=True)
class _Hub:
    """The arguments every huggingface_hub call of one :func:`open_model` shares."""

    api: Any
    repo_id: str
    token: str | bool | None
    cache_dir: str | None
    offline: bool

    def snapshot(self, revision: str | None, patterns: list[str]) -> Path:
        import huggingface_hub as hfh

        # local_files_only when offline: the hub then answers from its cache without trying the network.
        path = hfh.snapshot_download(
            self.repo_id,
            revision=revision,
            allow_patterns=patterns,
            token=self.token,
            cache_dir=self.cache_dir,
            local_files_only=self.offline,
        )
        return Path(path)

    def listing(self, sha: str | None) -> list[str] | None:
        """The repo's file names at ``sha``: the cached tree listing, else (online) asked from the Hub."""
        import huggingface_hub as hfh
        from huggingface_hub.errors import CachedRepoTreeNotFoundError

        if sha is None:
            return None
        try:
            tree = hfh.get_cached_repo_tree(self.repo_id, revision=sha, cache_dir=self.cache_dir)
            return [f.path for f in tree]
        except (CachedRepoTreeNotFoundError, OSError, ValueError):
            pass  # not cached (or unreadable): ask the Hub when allowed
        if self.offline:
            return None
        return list(self.api.list_repo_files(self.repo_id, revision=sha, token=self.token))


def _open_hub_weights(hub: _Hub, folder: Path, sha: str | None, patterns: list[str]) -> Checkpoint:
    """Step 2 for commands that read tensors: download exactly the checkpoint's shards, then open."""
    from moetool.io.checkpoint import Checkpoint

    index = _read_index(folder)
    listing = None if index is not None else hub.listing(sha)
    weights = _weight_files(folder, index, listing)
    pickles = _pickle_weights(listing)
    if weights == [] and pickles:
        raise PickleRefusedError(
            f"{hub.repo_id}{_at(sha)} has only pickle weights ({', '.join(pickles[:5])})",
            hint="look for a safetensors revision (a refs/pr/N 'Adding safetensors' PR) and pass it with "
            "--revision; moetool never unpickles weights",
        )
    if weights and not all((folder / w).is_file() for w in weights):
        # Pinned to the commit of step 1. Names are escaped: allow_patterns are fnmatch patterns and a
        # hostile index could list '*'.
        folder = hub.snapshot(sha, patterns + [glob.escape(w) for w in weights])
    return Checkpoint.open(folder, name=hub.repo_id, revision=sha)


def _open_hub_headers(hub: _Hub, folder: Path, sha: str | None) -> Checkpoint:
    """For inspect: read the shard headers (local cache, else remote range requests), never weights."""
    from huggingface_hub.errors import NotASafetensorsRepoError

    from moetool.io.checkpoint import Checkpoint, load_config

    index = _read_index(folder)
    local = _weight_files(folder, index, None)
    standard = index is not None or local == [SINGLE_FILE_NAME]
    if standard and local and all((folder / w).is_file() for w in local):
        # A previous download left the shards in the cache: reading 8 + N bytes each beats the network.
        return Checkpoint.open(folder, name=hub.repo_id, revision=sha)

    config = load_config(folder)
    notes: list[str] = []
    headers: list[SafetensorsHeader] = []
    if hub.offline:
        if index is not None and local:
            have = sum((folder / w).is_file() for w in local)
            notes.append(f"offline: {have} of {len(local)} shard(s) are cached, so no tensors are listed")
        else:
            notes.append("offline: the weights are not cached, so no tensors are listed")
        index = None  # the shards it names are not read: do not let from_headers call them missing
    else:
        try:
            meta = hub.api.get_safetensors_metadata(hub.repo_id, revision=sha, token=hub.token)
        except NotASafetensorsRepoError:
            meta = None
            listing = hub.listing(sha)
            pickles = _pickle_weights(listing)
            others = _weight_files(folder, None, listing) if listing is not None else None
            if pickles and not others:
                notes.append(
                    f"{hub.repo_id} stores its weights only as pickle ({', '.join(pickles[:5])}); "
                    "moetool never reads pickle, so no tensors are listed"
                )
            elif others:
                notes.append(
                    f"{hub.repo_id} has no {SINGLE_FILE_NAME} or {INDEX_NAME}; {', '.join(others[:5])} were not read"
                )
            else:
                notes.append(f"{hub.repo_id} has no safetensors weights; only config.json was read")
            index = None
        if meta is not None:
            headers = [_header_from_hub(f, m) for f, m in sorted(meta.files_metadata.items())]
    checkpoint = Checkpoint.from_headers(name=hub.repo_id, config=config, headers=headers, revision=sha, index=index)
    checkpoint.warnings.extend(notes)
    return checkpoint


def open_model(
    spec: str,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: Path | None = None,
    offline: bool | None = None,
    need_weights: bool = True,
) -> Checkpoint:
    """Open ``MODEL``: a local folder, a Hugging Face cache snapshot folder, or a Hub repo id.

    A local path wins when it exists. A repo id goes through huggingface_hub and its cache: with
    ``need_weights`` the config, tokenizer files, index and exactly the safetensors shards the index
    lists are downloaded (never pickle files); without it (``inspect``) only config.json and the
    index are downloaded and the shard headers are read remotely with HTTP range requests.

    Args:
        spec: what the user typed as ``MODEL``.
        revision: a branch, tag, commit sha or ``refs/pr/N`` of a Hub repo; the checkpoint records the
            full commit sha it resolved to.
        token: the Hub token (``None``: huggingface_hub's own resolution, ``HF_TOKEN`` then the saved
            login; ``False``: anonymous).
        cache_dir: the Hub cache folder; ``None`` uses ``HF_HUB_CACHE`` / ``HF_HOME``.
        offline: ``True`` never touches the network; ``None`` follows ``HF_HUB_OFFLINE``. ``False``
            cannot override ``HF_HUB_OFFLINE=1``, which huggingface_hub itself enforces.
        need_weights: whether the command reads tensor data (download the shards) or only headers.

    Returns:
        The opened checkpoint; ``revision`` holds the commit sha for Hub repos and cache snapshots.

    Raises:
        UsageError: ``--revision`` with a local path, or an empty ``spec``.
        SourceNotFoundError: codes ``NOT_A_FOLDER``, ``SOURCE_NOT_FOUND``, ``REPO_NOT_FOUND``,
            ``GATED_REPO``, ``REVISION_NOT_FOUND``, ``OFFLINE_NOT_CACHED``, ``HUB_UNREACHABLE``,
            ``AUTH_FAILED``.
        ConfigError: ``CONFIG_MISSING`` when the repo has no config.json.
        PickleRefusedError: the repo's weights exist only as pickle and ``need_weights`` is set.
        CheckpointError: what :meth:`Checkpoint.open` raises for a malformed checkpoint.
    """
    ref = parse_model_ref(spec, revision=revision)
    if ref.local_path is not None:
        from moetool.io.checkpoint import Checkpoint

        return Checkpoint.open(ref.local_path, name=spec, revision=ref.revision)
    assert ref.repo_id is not None
    return _open_hub(
        ref.repo_id,
        revision=revision,
        token=token,
        cache_dir=cache_dir,
        offline=bool(offline) or _env_offline(),
        need_weights=need_weights,
    )
