"""``moetool-manifest.json``: the SHA-256 and size of every file of an output, and the check against it.

Every command that writes a folder writes the manifest last, just before publishing
(:func:`write_manifest`, called by :func:`moetool.io.writer.staged_output`). :func:`verify_folder` (the
``moetool verify`` command) reads a folder back and reports each file that changed, is missing or was
added, so a copy, a download or an upload can be checked byte for byte. The manifest does not list
itself; files the Hub adds to a repository (``.gitattributes``) and the download metadata of
``huggingface_hub`` (``.cache/``) are not counted as extra.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moetool.errors import MoetoolError

__all__ = [
    "MANIFEST_NAME",
    "FileEntry",
    "ManifestError",
    "VerifyResult",
    "hash_file",
    "read_manifest",
    "verify_folder",
    "write_manifest",
]

MANIFEST_NAME = "moetool-manifest.json"
SCHEMA_VERSION = 1
# Files that are not part of the output but appear beside it legitimately: the Hub creates
# .gitattributes in every new repository, and huggingface_hub keeps download metadata in .cache/.
_IGNORED_NAMES = frozenset({".gitattributes"})
_IGNORED_DIRS = frozenset({".cache"})
_CHUNK = 1 << 20
_THREADS = 4


class ManifestError(MoetoolError):
    """A manifest that is missing, unreadable, or not moetool's (codes ``MANIFEST_MISSING``, ``MANIFEST_INVALID``)."""

    default_code = "MANIFEST_INVALID"


@dataclass(frozen=True)
class FileEntry:
    """One file of a manifest: its path relative to the folder (``/``-separated), size and SHA-256."""

    path: str
    size: int
    sha256: str


@dataclass
class VerifyResult:
    """What :func:`verify_folder` found.

    Attributes:
        folder: the folder checked.
        files: the number of files the manifest lists.
        bytes: their total size.
        changed: files whose size or SHA-256 differs from the manifest.
        missing: files the manifest lists that are not there.
        extra: files that are there but not in the manifest.
    """

    folder: str
    files: int = 0
    bytes: int = 0
    changed: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the folder holds exactly the files of the manifest, byte for byte."""
        return not (self.changed or self.missing or self.extra)

    def to_json(self) -> dict[str, Any]:
        """The ``moetool verify --json`` document (``schema_version`` 1)."""
        return {
            "schema_version": SCHEMA_VERSION,
            "folder": self.folder,
            "ok": self.ok,
            "files": self.files,
            "bytes": self.bytes,
            "changed": self.changed,
            "missing": self.missing,
            "extra": self.extra,
        }


def hash_file(path: Path) -> str:
    """The SHA-256 of a file's content, as lowercase hex (read in 1 MiB chunks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _listed_files(folder: Path) -> list[str]:
    """Every regular file below ``folder`` (symlinks followed for files, as in a Hub cache snapshot)."""
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        relative_dir = Path(dirpath).relative_to(folder)
        if relative_dir == Path("."):
            dirnames[:] = [d for d in dirnames if d not in _IGNORED_DIRS]
        for name in filenames:
            relative = (relative_dir / name).as_posix()
            if relative == MANIFEST_NAME or (name in _IGNORED_NAMES and relative_dir == Path(".")):
                continue
            if Path(dirpath, name).is_file():
                found.append(relative)
    return sorted(found)


def _entries(folder: Path, names: list[str]) -> list[FileEntry]:
    def one(name: str) -> FileEntry:
        path = folder / name
        return FileEntry(path=name, size=path.stat().st_size, sha256=hash_file(path))

    # hashlib releases the GIL on large buffers: shards hash in parallel.
    with ThreadPoolExecutor(max_workers=max(1, min(_THREADS, len(names)))) as pool:
        return list(pool.map(one, names))


def write_manifest(folder: Path) -> Path:
    """Hash every file of ``folder`` and write ``moetool-manifest.json`` there.

    Args:
        folder: a finished output folder (normally the staging folder, just before publishing).

    Returns:
        The manifest's path.
    """
    from moetool.io.writer import write_json
    from moetool.versions import versions

    folder = Path(folder)
    entries = _entries(folder, _listed_files(folder))
    document = {
        "schema_version": SCHEMA_VERSION,
        "algorithm": "sha256",
        "versions": versions(),
        "files": {e.path: {"size": e.size, "sha256": e.sha256} for e in entries},
    }
    path = folder / MANIFEST_NAME
    write_json(path, document)
    return path


def read_manifest(folder: Path) -> list[FileEntry]:
    """The entries of ``folder/moetool-manifest.json``.

    Raises:
        ManifestError: ``MANIFEST_MISSING`` when the folder has none, ``MANIFEST_INVALID`` when it is
            not a moetool manifest (bad JSON, unknown schema, unsafe paths, malformed entries).
    """
    path = Path(folder) / MANIFEST_NAME
    if not Path(folder).is_dir():
        raise ManifestError(f"{folder} is not a folder", hint="pass the output folder of a moetool command")
    if not path.is_file():
        raise ManifestError(
            f"{folder} has no {MANIFEST_NAME}",
            hint="only folders written by moetool (merge, quantize, upcycle, distill, profile-routing --out) have one",
            code="MANIFEST_MISSING",
        )
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"cannot read {path}: {exc}") from None
    if not isinstance(document, dict) or document.get("schema_version") != SCHEMA_VERSION:
        raise ManifestError(f"{path} is not a moetool manifest of schema version {SCHEMA_VERSION}")
    files = document.get("files")
    if not isinstance(files, dict):
        raise ManifestError(f"{path} has no 'files' object")
    entries: list[FileEntry] = []
    for name, info in files.items():
        parts = Path(name).parts
        if not name or Path(name).is_absolute() or ".." in parts or "\\" in name:
            raise ManifestError(f"{path} lists an unsafe path {name!r}", code="UNSAFE_PATH")
        if not (
            isinstance(info, dict)
            and isinstance(info.get("size"), int)
            and isinstance(info.get("sha256"), str)
            and len(info["sha256"]) == 64
        ):
            raise ManifestError(f"{path}: malformed entry for {name!r}")
        entries.append(FileEntry(path=name, size=info["size"], sha256=info["sha256"].lower()))
    return entries


def verify_folder(folder: Path) -> VerifyResult:
    """Check ``folder`` against its manifest: every listed file present with the same size and SHA-256,
    and no other file.

    Args:
        folder: a folder written by a moetool command (or a copy or download of one).

    Returns:
        The result; :attr:`VerifyResult.ok` says whether everything matched.

    Raises:
        ManifestError: no manifest, or an unreadable one.
    """
    folder = Path(folder)
    expected = read_manifest(folder)
    present = set(_listed_files(folder))
    result = VerifyResult(folder=str(folder), files=len(expected), bytes=sum(e.size for e in expected))
    to_hash: list[FileEntry] = []
    for entry in expected:
        path = folder / entry.path
        if entry.path not in present:
            result.missing.append(entry.path)
        elif path.stat().st_size != entry.size:
            result.changed.append(entry.path)  # no need to hash: the size already differs
        else:
            to_hash.append(entry)
    actual = {e.path: e.sha256 for e in _entries(folder, [e.path for e in to_hash])} if to_hash else {}
    result.changed += [e.path for e in to_hash if actual[e.path] != e.sha256]
    result.changed.sort()
    listed = {e.path for e in expected}
    result.extra = sorted(present - listed)
    return result
