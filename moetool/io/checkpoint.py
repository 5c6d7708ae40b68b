"""A validated, lazy view of a Hugging Face checkpoint folder (config.json + safetensors shards).

:meth:`Checkpoint.open` reads ``config.json``, the optional ``model.safetensors.index.json`` and the
header of every shard, and cross-checks them (file names stay inside the folder, no pickle, no
missing shard, no tensor stored twice, index and shards agree). It never reads tensor data: that
happens in :meth:`Checkpoint.read_tensor` / :meth:`Checkpoint.iter_tensors`, the only places that
import torch and safetensors.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moetool.errors import (
    CheckpointError,
    ConfigError,
    PickleRefusedError,
    SourceNotFoundError,
    UnsafePathError,
)
from moetool.io.jsonfile import load_json_file
from moetool.io.safetensors_header import (
    HINT_REDOWNLOAD,
    SafetensorsHeader,
    TensorInfo,
    read_header,
    short_repr,
)

if TYPE_CHECKING:
    import torch

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
SINGLE_FILE_NAME = "model.safetensors"

# How many offending names an error message lists before it only gives the count.
_LIST_LIMIT = 5

# Hugging Face cache repo folders: models--org--name, datasets--..., spaces--...
_HF_REPO_DIR = re.compile(r"^(models|datasets|spaces)--.+")
_DRIVE = re.compile(r"^[A-Za-z]:")

HINT_PICKLE = (
    "convert it to safetensors (e.g. transformers' save_pretrained(..., safe_serialization=True) in a "
    "trusted environment); moetool never unpickles weights"
)
HINT_UNSAFE = "file names in a checkpoint must stay inside the model folder; do not use this checkpoint"


def _listing(names: list[str]) -> str:
    shown = ", ".join(short_repr(n) for n in names[:_LIST_LIMIT])
    more = len(names) - _LIST_LIMIT
    return f"{shown} and {more} more" if more > 0 else shown


def _is_pickle_name(name: str) -> bool:
    return name.lower().endswith(PICKLE_SUFFIXES)


def load_config(folder: Path) -> dict[str, Any]:
    """Read ``config.json`` from a model folder, strictly.

    Args:
        folder: the model folder.

    Returns:
        The parsed JSON object.

    Raises:
        ConfigError: ``CONFIG_MISSING`` when there is no config.json, ``CONFIG_INVALID`` when it is not
            strict JSON or not an object.
        UnsafePathError: config.json is a symlink to a file outside the folder.
    """
    folder = Path(folder)
    path = folder / CONFIG_NAME
    if not (path.is_symlink() or path.exists()):
        raise ConfigError(
            f"no {CONFIG_NAME} in {folder}",
            hint="pass the folder that holds config.json (the one save_pretrained wrote)",
            code="CONFIG_MISSING",
        )
    real = resolve_inside(folder, CONFIG_NAME)
    config = load_json_file(
        real,
        what=f"{CONFIG_NAME} in {folder}",
        error=ConfigError,
        hint="fix or re-download config.json",
    )
    if not isinstance(config, dict):
        raise ConfigError(
            f"{CONFIG_NAME} in {folder} is a JSON {type(config).__name__}, not an object",
            hint="fix or re-download config.json",
            code="CONFIG_INVALID",
        )
    return config


def check_relative_name(name: object) -> str:
    """Check that a file name from an index is a plain relative path (no filesystem access).

    Args:
        name: the name as found in the index.

    Returns:
        The name, unchanged.

    Raises:
        UnsafePathError: empty, absolute, with ``..`` components, backslashes (UNC / Windows paths),
            a drive letter or a NUL byte.
    """

    def unsafe(why: str) -> UnsafePathError:
        return UnsafePathError(f"unsafe file name {short_repr(name)} in checkpoint: {why}", hint=HINT_UNSAFE)

    if not isinstance(name, str) or not name:
        raise unsafe("empty or not a string")
    if "\x00" in name:
        raise unsafe("contains a NUL byte")
    if "\\" in name:
        raise unsafe("contains a backslash (Windows or UNC path)")
    if _DRIVE.match(name):
        raise unsafe("starts with a drive letter")
    if name.startswith("/"):
        raise unsafe("is an absolute path")
    parts = name.split("/")
    if ".." in parts:
        raise unsafe("has a '..' component")
    if "" in parts:
        raise unsafe("has an empty path component")
    return name


def _hf_blobs_dir(root: Path) -> Path | None:
    """The ``blobs`` folder of the HF cache repo that ``root`` (a resolved path) is a snapshot of."""
    for folder in (root, *root.parents):
        snapshots = folder.parent
        if snapshots.name == "snapshots" and _HF_REPO_DIR.match(snapshots.parent.name):
            return snapshots.parent / "blobs"
    return None


def resolve_inside(root: Path, name: str) -> Path:
    """Validate a file name relative to ``root`` and resolve it, refusing anything outside.

    The name is checked as a string first (:func:`check_relative_name`), before any filesystem access.
    Symlinks are then resolved: the target must lie inside ``root`` or, when ``root`` is a Hugging Face
    cache snapshot (``.../models--org--name/snapshots/<rev>/``), inside that same repo's ``blobs``
    folder, where the cache keeps the real files.

    Args:
        root: the model folder.
        name: a file name relative to it, as found in an index or a directory listing.

    Returns:
        The resolved path of the file (it may not exist).

    Raises:
        UnsafePathError: the name is unsafe, or it resolves outside the allowed folders.
    """
    check_relative_name(name)
    try:
        real_root = Path(root).resolve()
        target = (real_root / name).resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop (RuntimeError before Python 3.13)
        raise UnsafePathError(f"cannot resolve {short_repr(name)} in {root}: {exc}", hint=HINT_UNSAFE) from None
    if target.is_relative_to(real_root):
        return target
    blobs = _hf_blobs_dir(real_root)
    if blobs is not None and target.is_relative_to(blobs.resolve()):
        return target
    raise UnsafePathError(
        f"{short_repr(name)} in {root} resolves to {target}, outside the model folder",
        hint=HINT_UNSAFE,
    )


def _refuse_pickle(names: list[str], where: str) -> PickleRefusedError:
    return PickleRefusedError(f"{where} stores weights as pickle: {_listing(names)}", hint=HINT_PICKLE)


def _parse_index(index: Any, what: str) -> tuple[dict[str, str], dict[str, Any]]:
    """Check an index document's structure; return (weight_map, metadata)."""

    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{what} {why}", hint="fix or re-download the index file", code="INDEX_INVALID")

    if not isinstance(index, dict):
        raise bad(f"is a JSON {type(index).__name__}, not an object")
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise bad("has no weight_map object")
    if not weight_map:
        raise bad("has an empty weight_map")
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str):
            raise bad(f"maps tensor {short_repr(tensor)} to a {type(shard).__name__}, not a file name")
    metadata = index.get("metadata")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise bad("has a metadata entry that is not an object")
    # String-level checks need no filesystem: refuse unsafe and pickle names before anything is opened.
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        check_relative_name(shard)
    pickles = [s for s in shards if _is_pickle_name(s)]
    if pickles:
        raise _refuse_pickle(pickles, what)
    return weight_map, metadata


@dataclass
class Checkpoint:
    """A checkpoint's config and tensor catalogue; tensor data is read only on demand.

    Attributes:
        name: how to show the checkpoint (a path or a repo id).
        config: the parsed config.json.
        tensors: every tensor across shards, in shard order then header order.
        shards: shard file names relative to the model folder.
        root: the model folder; ``None`` for a remote (headers-only) checkpoint.
        revision: the revision the checkpoint was read at, when known.
        index_metadata: the ``metadata`` object of the index file, ``{}`` without one.
        warnings: problems that do not stop reading (e.g. a wrong ``total_size``).
    """

    name: str
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    shards: list[str]
    root: Path | None = None
    revision: str | None = None
    index_metadata: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @classmethod
    def open(cls, folder: Path, *, name: str | None = None, revision: str | None = None) -> Checkpoint:
        """Open a local checkpoint folder: config, index and shard headers, all validated.

        Args:
            folder: the model folder (a plain folder or a Hugging Face cache snapshot).
            name: how to show the checkpoint; defaults to the folder path.
            revision: the revision it was downloaded at, when known.

        Returns:
            The checkpoint; no tensor data has been read.

        Raises:
            SourceNotFoundError: the folder does not exist or is not a folder.
            ConfigError: config.json is missing (``CONFIG_MISSING``) or invalid (``CONFIG_INVALID``).
            UnsafePathError: a shard name or symlink points outside the folder.
            PickleRefusedError: the weights are stored as pickle.
            CheckpointError: a malformed index or shard, a missing shard (``SHARD_MISSING``), the same
                tensor in two shards (``DUPLICATE_TENSOR``), index and shards disagreeing
                (``INDEX_MISMATCH``).
        """
        folder = Path(folder)
        if not folder.is_dir():
            why = "is not a folder" if folder.exists() else "does not exist"
            raise SourceNotFoundError(f"{folder} {why}", hint="pass a local folder or a Hub repo id")
        config = load_config(folder)
        warnings: list[str] = []
        index: dict[str, Any] | None = None

        index_path = folder / INDEX_NAME
        if index_path.is_symlink() or index_path.exists():
            index_real = resolve_inside(folder, INDEX_NAME)
            try:
                index = load_json_file(
                    index_real,
                    what=f"{INDEX_NAME} in {folder}",
                    error=CheckpointError,
                    hint="fix or re-download the index file",
                )
            except CheckpointError as exc:
                raise CheckpointError(exc.message, hint=exc.hint, code="INDEX_INVALID") from None
            weight_map, _ = _parse_index(index, f"{INDEX_NAME} in {folder}")
            shard_names = sorted(set(weight_map.values()))
        elif (folder / SINGLE_FILE_NAME).is_symlink() or (folder / SINGLE_FILE_NAME).exists():
            shard_names = [SINGLE_FILE_NAME]
        else:
            # Dot files are editor / OS debris (e.g. macOS "._model.safetensors"), not shards.
            shard_names = sorted(p.name for p in folder.glob("*.safetensors") if not p.name.startswith("."))
            if len(shard_names) > 1:
                warnings.append(
                    f"no {INDEX_NAME}: reading all {len(shard_names)} *.safetensors files as one checkpoint"
                )
            if not shard_names:
                pickles = sorted(
                    p.name
                    for p in folder.iterdir()
                    if _is_pickle_name(p.name) or p.name.lower().endswith(".bin.index.json")
                )
                if pickles:
                    raise _refuse_pickle(pickles, str(folder))
                warnings.append("no weight files: only config.json is available")

        paths = {shard: resolve_inside(folder, shard) for shard in shard_names}
        missing = [shard for shard, path in paths.items() if not path.is_file()]
        if missing:
            raise CheckpointError(
                f"{len(missing)} shard file(s) missing in {folder}: {', '.join(short_repr(m) for m in missing)}",
                hint="re-run the download (hf download REPO), or check that the folder is complete",
                code="SHARD_MISSING",
            )
        headers = [read_header(paths[shard], file=shard) for shard in shard_names]
        return cls._assemble(
            name=name if name is not None else str(folder),
            config=config,
            headers=headers,
            index=index,
            index_what=f"{INDEX_NAME} in {folder}",
            root=folder,
            revision=revision,
            warnings=warnings,
        )

    @classmethod
    def from_headers(
        cls,
        *,
        name: str,
        config: dict[str, Any],
        headers: list[SafetensorsHeader],
        revision: str | None = None,
        index: dict[str, Any] | None = None,
    ) -> Checkpoint:
        """Build a remote (headers-only) checkpoint, with the same cross-shard checks as :meth:`open`.

        Args:
            name: how to show the checkpoint (usually the repo id).
            config: the parsed config.json.
            headers: the header of every shard, in shard order.
            revision: the revision the headers were read at.
            index: the parsed ``model.safetensors.index.json``, if the repo has one.

        Returns:
            A checkpoint with ``root=None``: tensor data cannot be read from it.

        Raises:
            UnsafePathError, PickleRefusedError, CheckpointError: as for :meth:`open`.
        """
        return cls._assemble(
            name=name,
            config=config,
            headers=headers,
            index=index,
            index_what=f"{INDEX_NAME} of {name}",
            root=None,
            revision=revision,
            warnings=[],
        )

    @classmethod
    def _assemble(
        cls,
        *,
        name: str,
        config: dict[str, Any],
        headers: list[SafetensorsHeader],
        index: dict[str, Any] | None,
        index_what: str,
        root: Path | None,
        revision: str | None,
        warnings: list[str],
    ) -> Checkpoint:
        """Merge shard headers into one catalogue and check them against each other and the index."""
        tensors: dict[str, TensorInfo] = {}
        for header in headers:
            for tname, info in header.tensors.items():
                if tname in tensors:
                    raise CheckpointError(
                        f"tensor {short_repr(tname)} is stored twice in {name}: "
                        f"in {tensors[tname].file} and in {info.file}",
                        hint="remove the stray shard file, or re-download the checkpoint",
                        code="DUPLICATE_TENSOR",
                    )
                tensors[tname] = info
        shards = [h.file for h in headers]

        index_metadata: dict[str, Any] = {}
        if index is not None:
            weight_map, index_metadata = _parse_index(index, index_what)
            missing_shards = sorted(set(weight_map.values()) - set(shards))
            if missing_shards:
                raise CheckpointError(
                    f"{len(missing_shards)} shard file(s) listed in {index_what} are missing: "
                    f"{', '.join(short_repr(m) for m in missing_shards)}",
                    hint="re-run the download (hf download REPO), or check that the folder is complete",
                    code="SHARD_MISSING",
                )
            problems = []
            for tname, shard in weight_map.items():
                info = tensors.get(tname)
                if info is None:
                    problems.append(f"{short_repr(tname)} is in the index ({short_repr(shard)}) but in no shard")
                elif info.file != shard:
                    problems.append(f"{short_repr(tname)} is mapped to {short_repr(shard)} but stored in {info.file}")
            problems += [
                f"{short_repr(tname)} is in {info.file} but not in the index"
                for tname, info in tensors.items()
                if tname not in weight_map
            ]
            if problems:
                shown = "; ".join(problems[:_LIST_LIMIT])
                more = f" (and {len(problems) - _LIST_LIMIT} more)" if len(problems) > _LIST_LIMIT else ""
                raise CheckpointError(
                    f"{index_what} disagrees with the shards in {len(problems)} place(s): {shown}{more}",
                    hint=HINT_REDOWNLOAD,
                    code="INDEX_MISMATCH",
                )
            total = index_metadata.get("total_size")
            stored = sum(t.nbytes for t in tensors.values())
            if total is not None and total != stored:
                warnings.append(
                    f"{index_what}: metadata.total_size is {short_repr(total)} "
                    f"but the shards hold {stored} bytes of tensors"
                )

        return cls(
            name=name,
            config=config,
            tensors=tensors,
            shards=shards,
            root=root,
            revision=revision,
            index_metadata=dict(index_metadata),
            warnings=warnings,
        )

    @property
    def has_weights(self) -> bool:
        """Whether the checkpoint stores at least one tensor."""
        return bool(self.tensors)

    def dtype_bytes(self) -> dict[str, int]:
        """Stored bytes per dtype string, in order of first appearance."""
        out: dict[str, int] = {}
        for info in self.tensors.values():
            out[info.dtype] = out.get(info.dtype, 0) + info.nbytes
        return out

    def total_bytes(self) -> int:
        """Stored bytes of all tensors (headers not included)."""
        return sum(info.nbytes for info in self.tensors.values())

    def _info(self, name: str) -> TensorInfo:
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(
                f"tensor {short_repr(name)} is not in {self.name}",
                hint="list the tensor names with moetool inspect --all",
                code="TENSOR_NOT_FOUND",
            )
        return info

    def _shard_path(self, shard: str) -> Path:
        if self.root is None:
            raise CheckpointError(
                f"{self.name} was read from its headers only; it has no local weights",
                hint="download the checkpoint (hf download REPO) and pass the local folder",
                code="NO_LOCAL_WEIGHTS",
            )
        # Re-checked at read time: the folder may have changed since open().
        return resolve_inside(self.root, shard)

    def read_tensor(self, name: str) -> torch.Tensor:
        """Read one tensor, opening only the shard that holds it.

        Args:
            name: the tensor name.

        Returns:
            The tensor, on the CPU.

        Raises:
            CheckpointError: ``TENSOR_NOT_FOUND``, ``NO_LOCAL_WEIGHTS`` for a remote checkpoint,
                ``SHARD_UNREADABLE`` when safetensors cannot load it (changed file, dtype torch lacks).
        """
        info = self._info(name)
        reader = self._read_shard(info.file, [name])
        try:
            return next(reader)[1]
        finally:
            reader.close()  # closes the shard now, not when the generator is collected

    def iter_tensors(self, names: Iterable[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(name, tensor)`` pairs, grouped by shard, with one shard open at a time.

        Args:
            names: the tensors to read (all when ``None``); every name is checked before anything is
                read. Within a shard, tensors come in the order given.

        Raises:
            CheckpointError: as :meth:`read_tensor`.
        """
        wanted = list(self.tensors) if names is None else list(dict.fromkeys(names))
        by_shard: dict[str, list[str]] = {shard: [] for shard in self.shards}
        for tname in wanted:
            by_shard[self._info(tname).file].append(tname)
        for shard, shard_names in by_shard.items():
            if shard_names:
                yield from self._read_shard(shard, shard_names)

    @contextlib.contextmanager
    def open_slices(self, names: Iterable[str]) -> Iterator[dict[str, Any]]:
        """Lazy handles on some tensors: ``{name: slice}``, read when indexed (``slice[...]``).

        The shards holding them stay open while the context lasts; nothing is read until a slice is
        indexed, and then with ``pread`` into memory of the tensor's own (not through a memory map,
        whose pages would stay resident beside the copy). This is how the layer-streamed runner reads
        one layer at a time.

        Raises:
            CheckpointError: as :meth:`read_tensor`.
        """
        from safetensors import SafetensorError, safe_open  # lazy: keeps torch out of inspect

        wanted = list(dict.fromkeys(names))
        by_shard: dict[str, list[str]] = {}
        for tname in wanted:
            by_shard.setdefault(self._info(tname).file, []).append(tname)
        with contextlib.ExitStack() as stack:
            slices: dict[str, Any] = {}
            for shard, shard_names in by_shard.items():
                try:
                    path = str(self._shard_path(shard))
                    handle = stack.enter_context(safe_open(path, framework="pt", device="cpu", backend="pread"))
                    for tname in shard_names:
                        slices[tname] = handle.get_slice(tname)
                except (SafetensorError, OSError, TypeError, ValueError) as exc:
                    raise CheckpointError(
                        f"cannot read tensors from {shard} in {self.name}: {exc}",
                        hint="the file may have changed since it was opened; " + HINT_REDOWNLOAD,
                        code="SHARD_UNREADABLE",
                    ) from exc
            yield slices

    def _read_shard(self, shard: str, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        path = self._shard_path(shard)
        from safetensors import SafetensorError, safe_open  # lazy: keeps torch out of inspect

        try:
            with safe_open(str(path), framework="pt", device="cpu") as fh:
                for tname in names:
                    yield tname, fh.get_tensor(tname)
        except (SafetensorError, OSError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"cannot read tensors from {shard} in {self.name}: {exc}",
                hint="the file may have changed since it was opened, or hold a dtype this torch lacks; "
                + HINT_REDOWNLOAD,
                code="SHARD_UNREADABLE",
            ) from exc
