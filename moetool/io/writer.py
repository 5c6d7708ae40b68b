"""Safe, streaming output: checked paths, a staged folder published atomically, size-bounded shards.

Every command that writes a model (upcycle, merge, quantize, distill) goes through this module:

* :func:`check_output_path` refuses an output that overlaps an input, is a symlink, or already holds
  something (unless ``--overwrite``), before any compute starts.
* :func:`staged_output` hands out a private staging folder beside the output, holds a lock so two runs
  cannot race for the same output, and publishes with a rename only when the block finishes; on any
  exception, Ctrl-C or SIGTERM it removes everything it created, so the output is either complete or
  absent and the input is never touched.
* :class:`ShardedWriter` writes tensors into safetensors shards as they arrive, keeping about one
  shard in memory, and names shards and the index the way ``save_pretrained`` does.

torch and safetensors are imported inside the functions that need them, so ``moetool --help`` stays
free of them.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import os
import re
import secrets
import shutil
import signal
import socket
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moetool.errors import (
    InputChangedError,
    MoetoolError,
    MoetoolWarning,
    NonfiniteError,
    OutputError,
    UnsafePathError,
    UsageError,
)

if TYPE_CHECKING:  # pragma: no cover - typing only, keeps torch out of the import graph
    import torch

__all__ = [
    "AUX_FILE_PATTERNS",
    "DEFAULT_MAX_SHARD_SIZE",
    "INDEX_NAME",
    "SINGLE_SHARD_NAME",
    "DiskFullError",
    "DuplicateTensorError",
    "ShardedWriter",
    "Terminated",
    "WriteResult",
    "abandon_active_outputs",
    "check_disk_space",
    "check_output_path",
    "copy_aux_files",
    "parse_size",
    "staged_output",
    "stale_staging_dirs",
    "write_json",
    "write_text",
]

# The hub and mergekit convention: many 5 GB shards stream and resume better than a few huge ones.
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9
SINGLE_SHARD_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"

STAGING_PREFIX = ".moetool-tmp-"
OLD_PREFIX = ".moetool-old-"
LOCK_PREFIX = ".moetool-lock-"
_SHARD_TMP_PREFIX = ".moetool-shard-"

# Files a user needs beside the weights to run the model. config.json is written by each command
# itself (it changes), weights are rewritten, and README.md is replaced by moetool's own model card.
AUX_FILE_PATTERNS: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "spiece.model",
    "*.tiktoken",
    "chat_template.json",
    "chat_template.jinja",
    "generation_config.json",
    "preprocessor_config.json",
)


class DuplicateTensorError(MoetoolError, ValueError):
    """The same tensor name was given to :meth:`ShardedWriter.add` twice (a bug in the caller)."""

    default_code = "DUPLICATE_TENSOR"


class DiskFullError(MoetoolError):
    """The output's file system has no room for what is about to be written."""

    default_code = "DISK_FULL"


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when SIGTERM or SIGHUP arrives inside :func:`staged_output`.

    It is a :class:`KeyboardInterrupt` so that every ``except Exception`` lets it through and the CLI
    treats it like Ctrl-C (cleanup, exit code 130).
    """


# --------------------------------------------------------------------------------------------------
# Sizes


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)
_SIZE_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_size(value: str | int) -> int:
    """Parse a size such as ``"5GB"``, ``"500MiB"``, ``"500M"`` or ``1000000`` into bytes.

    Decimal units (KB, MB, GB, TB, and the bare K, M, G, T) are powers of 1000, as in
    ``huggingface_hub``; binary units (KiB, MiB, GiB, TiB) are powers of 1024. Case does not matter.

    Args:
        value: an integer number of bytes, or a string with an optional unit.

    Returns:
        The size in bytes, always positive.

    Raises:
        UsageError: the value is not a size, or is zero or negative.
    """
    hint = 'use a positive size such as "5GB", "500MB" or "2GiB"'
    if isinstance(value, bool):  # bool is an int subclass; True is not a size
        raise UsageError(f"invalid size {value!r}", hint=hint)
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        match = _SIZE_RE.match(value)
        if not match:
            raise UsageError(f"invalid size {value!r}", hint=hint)
        number, prefix, binary, _ = match.groups()
        if binary and not prefix:  # "5iB" is not a unit
            raise UsageError(f"invalid size {value!r}", hint=hint)
        base = 1024 if binary else 1000
        multiplier = base ** _SIZE_POWERS[prefix.lower()]
        # Decimal numbers are allowed ("1.5GB") but the result must be whole bytes.
        if "." in number:
            whole, frac = number.split(".")
            size = int(whole) * multiplier + (int(frac) * multiplier) // (10 ** len(frac))
        else:
            size = int(number) * multiplier
    else:
        raise UsageError(f"invalid size {value!r}", hint=hint)
    if size <= 0:
        raise UsageError(f"size must be positive, got {value!r}", hint=hint)
    return size


# --------------------------------------------------------------------------------------------------
# Output path checks


def _is_within(child: Path, parent: Path) -> bool:
    """True when ``child`` equals ``parent`` or lies below it (both already resolved)."""
    return child == parent or parent in child.parents


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _existing_ancestors(path: Path) -> Iterator[Path]:
    """``path`` and its parents that exist, nearest first."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            yield candidate


def _overlaps(out: Path, protected: Path) -> bool:
    """True when ``out`` is, contains or is inside ``protected``.

    Resolved paths catch symlinked spellings; ``samefile`` on existing ancestors also catches bind
    mounts and case-insensitive file systems, where two different strings name one folder.
    """
    out_res = out.resolve()
    prot_res = protected.resolve()
    if _is_within(out_res, prot_res) or _is_within(prot_res, out_res):
        return True
    if protected.exists() and any(_same_file(a, protected) for a in _existing_ancestors(out)):
        return True
    return out.exists() and any(_same_file(a, out) for a in _existing_ancestors(protected))


def _hf_hub_cache() -> Path | None:
    try:
        from huggingface_hub import constants  # light: no torch
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return None
    return Path(constants.HF_HUB_CACHE)


def _protected_paths(inputs: Sequence[Path]) -> list[Path]:
    """The inputs plus the files their top-level symlinks point to (HF-cache blobs, for example)."""
    protected: list[Path] = []
    for item in inputs:
        path = Path(item)
        protected.append(path)
        if path.is_dir() and not path.is_symlink():
            with contextlib.suppress(OSError):
                for entry in os.scandir(path):
                    # The file a symlink points at (an HF-cache blob, say) is as much an input as
                    # the folder: an output that is or contains it would destroy it on --overwrite.
                    if entry.is_symlink():
                        protected.append(Path(entry.path).resolve())
    return protected


def check_output_path(out: Path, inputs: Sequence[Path] = (), *, overwrite: bool = False) -> None:
    """Refuse an output path that is unsafe to write, before any compute starts.

    Args:
        out: the output folder the user asked for.
        inputs: local input folders or files (model sources, configs) that must stay untouched.
        overwrite: allow replacing an existing non-empty output folder (it is still staged and
            swapped, never written into).

    Raises:
        OutputError: with code ``OUTPUT_IS_SYMLINK`` (``out`` is a symlink, even a dangling one),
            ``OUTPUT_OVERLAPS_INPUT`` (``out`` is, contains or is inside an input, or lies inside the
            Hugging Face cache), or ``OUTPUT_EXISTS`` (``out`` is a file, or a non-empty folder
            without ``overwrite``).
    """
    out = Path(os.path.abspath(out))
    # lstat, not exists(): a dangling symlink "does not exist" but would still be written through.
    if out.is_symlink():
        raise OutputError(
            f"output path {out} is a symlink; moetool never writes through symlinks",
            hint="pass the real folder as -o",
            code="OUTPUT_IS_SYMLINK",
        )
    for protected in _protected_paths(inputs):
        if _overlaps(out, protected):
            raise OutputError(
                f"output path {out} overlaps the input {protected}",
                hint="write the result to a separate folder",
                code="OUTPUT_OVERLAPS_INPUT",
            )
    cache = _hf_hub_cache()
    if cache is not None and cache.exists() and _is_within(out.resolve(), cache.resolve()):
        raise OutputError(
            f"output path {out} is inside the Hugging Face cache ({cache})",
            hint="the cache is managed by huggingface_hub; write the result to a separate folder",
            code="OUTPUT_OVERLAPS_INPUT",
        )
    if out.exists():
        if not out.is_dir():
            raise OutputError(
                f"output path {out} exists and is not a folder",
                hint="choose another -o",
                code="OUTPUT_EXISTS",
            )
        if not overwrite and any(out.iterdir()):
            raise OutputError(
                f"output folder {out} exists and is not empty",
                hint="choose another -o or pass --overwrite",
                code="OUTPUT_EXISTS",
            )


def check_disk_space(folder: Path, needed: int, *, what: str = "the output") -> None:
    """Refuse early when the file system holding ``folder`` has less than ``needed`` bytes free.

    Args:
        folder: the output folder or any path below an existing folder on the target file system.
        needed: bytes about to be written.
        what: how to name the data in the message.

    Raises:
        DiskFullError: not enough free space (the message gives both numbers).
    """
    probe = next(_existing_ancestors(Path(os.path.abspath(folder))), Path("/"))
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise DiskFullError(
            f"not enough disk space for {what} at {folder}: needs {needed:,} bytes, {free:,} free",
            hint="free some space or choose -o on another disk",
        )


# --------------------------------------------------------------------------------------------------
# Locks, staging, publishing


def _pid_alive(pid: int) -> bool:
    if pid <= 0:  # kill(0, ...) and kill(-1, ...) address process groups, never "one process"
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, it is just not ours
        return True
    except OSError:
        return False
    return True


def _read_lock(path: Path) -> tuple[int | None, str | None]:
    """The ``(pid, host)`` recorded in a lock file; ``None`` parts when unreadable."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None, None
    pid: int | None = None
    if lines:
        with contextlib.suppress(ValueError):
            pid = int(lines[0].strip())
    host = lines[1].strip() if len(lines) > 1 and lines[1].strip() else None
    return pid, host


def _lock_is_live(pid: int | None, host: str | None) -> bool:
    # A lock written on another machine (shared file system) cannot be checked from here: respect it.
    if host is not None and host != socket.gethostname():
        return True
    return pid is not None and _pid_alive(pid)


def _lock_text() -> str:
    return f"{os.getpid()}\n{socket.gethostname()}\n"


def _create_lock(path: Path) -> bool:
    """Create the lock file exclusively; False when it already exists."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(_lock_text())
    except BaseException:
        # A full disk lets the file be created but not written: never leave an empty lock behind.
        path.unlink(missing_ok=True)
        raise
    return True


def _acquire_lock(parent: Path, name: str) -> Path:
    lock = parent / f"{LOCK_PREFIX}{name}"
    for _ in range(5):
        if _create_lock(lock):
            return lock
        pid, host = _read_lock(lock)
        if _lock_is_live(pid, host):
            raise OutputError(
                f"another moetool run (pid {pid}) is writing {parent / name}",
                hint=f"wait for it to finish, or delete {lock} if no such run is active",
                code="OUTPUT_LOCKED",
            )
        # Stale lock from a killed run. Move it aside atomically rather than unlinking: if another
        # process took it over in between, we can tell from the content and put it back.
        aside = parent / f"{lock.name}.stale-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.rename(lock, aside)
        except FileNotFoundError:
            continue  # someone else removed it; try to create again
        moved_pid, moved_host = _read_lock(aside)
        if (moved_pid, moved_host) != (pid, host) and _lock_is_live(moved_pid, moved_host):
            with contextlib.suppress(OSError):
                os.link(aside, lock)  # restore the live lock we displaced; fails if one exists
            aside.unlink(missing_ok=True)
            raise OutputError(
                f"another moetool run (pid {moved_pid}) is writing {parent / name}",
                hint=f"wait for it to finish, or delete {lock} if no such run is active",
                code="OUTPUT_LOCKED",
            )
        aside.unlink(missing_ok=True)
        who = f"pid {pid}" if pid is not None else "no readable pid"
        warnings.warn(
            f"removed the stale lock {lock} of a moetool run that no longer exists ({who})",
            MoetoolWarning,
            stacklevel=4,
        )
    raise OutputError(
        f"could not take the lock {lock}",
        hint=f"delete {lock} if no moetool run is writing {parent / name}",
        code="OUTPUT_LOCKED",
    )


def _release_lock(lock: Path) -> None:
    # Only remove the lock if it is still ours (a user may have deleted and someone re-taken it).
    if _read_lock(lock)[0] == os.getpid():
        with contextlib.suppress(OSError):
            lock.unlink()


def _fsync_path(path: Path, *, directory: bool = False) -> None:
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:  # some platforms cannot open folders; durability is best effort there
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for filename in filenames:
            full = Path(dirpath, filename)
            if not full.is_symlink():
                _fsync_path(full)
        _fsync_path(Path(dirpath), directory=True)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM (and SIGHUP, unless ignored) into :class:`Terminated` so cleanup code runs."""
    if not _in_main_thread():
        yield
        return

    def handler(signum: int, _frame: Any) -> None:
        raise Terminated(f"received {signal.Signals(signum).name}")

    previous: dict[int, Any] = {}
    signums = [signal.SIGTERM]
    if hasattr(signal, "SIGHUP"):
        signums.append(signal.SIGHUP)
    for signum in signums:
        current = signal.getsignal(signum)
        # Respect an explicit "ignore" (nohup sets SIGHUP to SIG_IGN).
        if current is signal.SIG_IGN:
            continue
        previous[signum] = current
        signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old if old is not None else signal.SIG_DFL)


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold off SIGINT/SIGTERM/SIGHUP during a short critical section (publish or cleanup).

    A second Ctrl-C in the middle of a rename or of removing the staging folder would leave exactly
    the half state this module exists to prevent. Signals that arrive are dropped: after a publish the
    work is done, and during cleanup we are already on the way out.
    """
    if not _in_main_thread():
        yield
        return
    signums = [signal.SIGINT, signal.SIGTERM]
    if hasattr(signal, "SIGHUP"):
        signums.append(signal.SIGHUP)
    previous: dict[int, Any] = {}
    for signum in signums:
        current = signal.getsignal(signum)
        if current is signal.SIG_IGN:
            continue
        previous[signum] = current
        signal.signal(signum, lambda _s, _f: None)
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old if old is not None else signal.SIG_DFL)


def _remove_tree(path: Path) -> None:
    if path.is_symlink():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)


def _publish(staging: Path, out: Path) -> None:
    """Move the finished staging folder to ``out``; an existing ``out`` is swapped, then deleted."""
    if not out.exists():
        os.rename(staging, out)
        _fsync_path(out.parent, directory=True)
        return
    # Rename the old output aside first, so that a crash between the two renames leaves both the old
    # and the new copy on disk (as .moetool-old-* and .moetool-tmp-*), never neither.
    aside = out.parent / f"{OLD_PREFIX}{out.name}-{os.getpid()}-{secrets.token_hex(4)}"
    os.rename(out, aside)
    try:
        os.rename(staging, out)
    except BaseException:
        os.rename(aside, out)
        raise
    _fsync_path(out.parent, directory=True)
    _remove_tree(aside)


# Staging folders (and their locks) of this process, for the SIGBUS handler: a process that must
# die at once still removes what it created (see moetool.cli._faults).
_ACTIVE: dict[Path, Path] = {}


def abandon_active_outputs() -> None:
    """Remove the staging folders and locks this process holds (for a fatal-signal handler)."""
    for staging, lock in list(_ACTIVE.items()):
        _remove_tree(staging)
        _release_lock(lock)
        _ACTIVE.pop(staging, None)


def _free_bytes(folder: Path) -> int:
    probe = next(_existing_ancestors(Path(os.path.abspath(folder))), Path("/"))
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return 0


def _disk_full(out: Path, *, written: int = 0, what: str = "the output") -> DiskFullError:
    free = _free_bytes(out.parent)
    done = f"; {written:,} bytes were written before it ran out" if written else ""
    return DiskFullError(
        f"disk full while writing {what} at {out}: needs more than the {free:,} bytes free{done}",
        hint="free some space or choose -o on another disk; nothing was written",
    )


def _tree_bytes(folder: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def _leftover_name(entry: str, prefix: str) -> str | None:
    """The output name of a ``<prefix><name>-<pid>-<8 hex>`` folder, ``None`` for anything else."""
    parts = entry[len(prefix) :].rsplit("-", 2)
    if len(parts) != 3 or not parts[1].isdigit() or not re.fullmatch(r"[0-9a-f]{8}", parts[2]):
        return None
    return parts[0]


def _clean_leftovers(out: Path) -> None:
    """Remove what killed runs left beside ``out``; called while holding the output's lock.

    Holding the lock proves that no live run writes ``out``, so every ``.moetool-tmp-<name>-*``
    staging folder is an unfinished output of a dead run: it is removed, with a warning (it may hold
    gigabytes). A ``.moetool-old-<name>-*`` folder is an earlier output that a run killed mid-swap had
    renamed aside: removed when ``out`` exists (the swap had finished), kept with a warning otherwise
    (it is then the only copy of that earlier output).
    """
    parent = out.parent
    try:
        entries = sorted(parent.iterdir())
    except OSError:
        return
    for entry in entries:
        name = entry.name
        if name.startswith(f"{LOCK_PREFIX}{out.name}.stale-") and entry.is_file():
            entry.unlink(missing_ok=True)  # an aside of a stale lock a killed run was removing
            continue
        for prefix in (STAGING_PREFIX, OLD_PREFIX):
            if not name.startswith(prefix) or _leftover_name(name, prefix) != out.name:
                continue
            if not entry.is_dir() or entry.is_symlink() or _name_pid(name, prefix) == os.getpid():
                continue
            if prefix == OLD_PREFIX and not out.exists():
                warnings.warn(
                    f"{entry} holds an earlier {out.name} that an interrupted run had moved aside; it was kept "
                    f"(rename it back to {out.name}, or delete it)",
                    MoetoolWarning,
                    stacklevel=4,
                )
                continue
            size = _tree_bytes(entry)
            _remove_tree(entry)
            what = "unfinished output" if prefix == STAGING_PREFIX else "replaced output"
            warnings.warn(
                f"removed {entry.name} ({size:,} bytes), the {what} of an interrupted moetool run",
                MoetoolWarning,
                stacklevel=4,
            )


def _input_state(inputs: Sequence[Path | None]) -> dict[Path, tuple[int, int, int]]:
    """Size, mtime and inode of the input files that matter (weights, configs), to notice a change."""
    state: dict[Path, tuple[int, int, int]] = {}
    for item in inputs:
        if item is None:
            continue
        path = Path(item)
        files = [path] if path.is_file() else []
        if path.is_dir():
            with contextlib.suppress(OSError):
                files = [p for p in path.iterdir() if p.name.endswith((".safetensors", ".json"))]
        for file in files:
            with contextlib.suppress(OSError):
                st = file.stat()
                state[file] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return state


def _check_inputs_unchanged(before: dict[Path, tuple[int, int, int]]) -> None:
    for file, (size, mtime, inode) in before.items():
        try:
            st = file.stat()
            now = (st.st_size, st.st_mtime_ns, st.st_ino)
        except OSError:
            now = None
        if now != (size, mtime, inode):
            what = "was removed" if now is None else f"is now {now[0]:,} bytes (was {size:,})"
            if now is not None and now[0] == size:
                what = "was modified or replaced"
            raise InputChangedError(
                f"the input {file} changed while being read ({what}); nothing was written",
                hint="make sure no other program writes the input while moetool runs, then run the command again",
            )


def _finish_output(staging: Path, *, allow_nonfinite: bool) -> None:
    """Last checks of every written model before it is published.

    * ``auto_map`` (remote code) is never carried over silently: moetool does not copy the code it
      points to, and outputs load with transformers' own classes; it is dropped with a warning.
    * Every float tensor is scanned for NaN/Inf: they are refused (``NONFINITE_OUTPUT``) unless
      ``allow_nonfinite``, when they are reported.
    """
    from moetool.io.nonfinite import describe, scan_folder

    config_path = staging / "config.json"
    if config_path.is_file() and not config_path.is_symlink():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            config = None
        if isinstance(config, dict) and "auto_map" in config:
            dropped = config.pop("auto_map")
            write_json(config_path, config)
            names = ", ".join(sorted(dropped)) if isinstance(dropped, dict) else "remote code"
            warnings.warn(
                f"dropped auto_map ({names}) from the output's config.json: moetool never copies remote code, "
                "and the output loads with transformers' own classes",
                MoetoolWarning,
                stacklevel=4,
            )
    found = scan_folder(staging)
    if found and not allow_nonfinite:
        raise NonfiniteError(
            f"in the output, {describe(found)}; nothing was written",
            hint="check the input with moetool inspect --scan-nonfinite; --allow-nonfinite writes it anyway",
            code="NONFINITE_OUTPUT",
        )
    if found:
        warnings.warn(
            f"in the output, {describe(found)} (written anyway: --allow-nonfinite)", MoetoolWarning, stacklevel=4
        )


@contextmanager
def staged_output(
    out: Path,
    *,
    inputs: Sequence[Path] = (),
    overwrite: bool = False,
    allow_nonfinite: bool = False,
    expected_bytes: int | None = None,
) -> Iterator[Path]:
    """Write a model folder through a private staging folder that is published only on success.

    The staging folder is created beside ``out`` (same file system, so publishing is a rename) and a
    lock file ``.moetool-lock-<name>`` keeps a second run from writing the same output. Leftovers of
    killed runs for the same output (staging folders, locks) are removed with a warning. When the
    block ends normally the output is checked (``auto_map`` dropped, NaN/Inf refused, inputs
    unchanged since the block started), every file gets the mode the umask allows (0644 by default,
    whichever library wrote it), ``moetool-manifest.json`` records the SHA-256 of each file, every file
    is fsynced and the folder is renamed to ``out`` (an existing ``out`` is renamed aside, replaced,
    then deleted). When it ends with any exception, Ctrl-C, SIGTERM or ``SystemExit``, the staging
    folder and the lock are removed and the exception propagates; the inputs and any earlier ``out``
    are untouched. A ``kill -9`` leaves a ``.moetool-tmp-*`` folder that the next run for the same
    output removes.

    Args:
        out: the final output folder.
        inputs: local input paths that the output must not overlap (and must not change meanwhile).
        overwrite: replace an existing non-empty ``out``.
        allow_nonfinite: publish an output with NaN/Inf (with a warning) instead of refusing it.
        expected_bytes: the output's size when known: refused before anything is created when the
            disk has less free.

    Yields:
        The staging folder to write into.

    Raises:
        OutputError: from :func:`check_output_path`, ``OUTPUT_LOCKED`` when another live run holds the
            lock, or ``OUTPUT_UNWRITABLE`` when the parent folder cannot be written.
        DiskFullError: not enough space (before anything is created when ``expected_bytes`` says so).
        NonfiniteError: ``NONFINITE_OUTPUT``, the output holds NaN/Inf.
        InputChangedError: an input file changed while the block ran.
    """
    out = Path(os.path.abspath(out))
    check_output_path(out, inputs, overwrite=overwrite)
    if expected_bytes is not None:
        check_disk_space(out, expected_bytes)
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if _is_disk_full(exc):
            raise _disk_full(out) from None
        raise OutputError(
            f"cannot create the output's parent folder {parent}: {exc.strerror}",
            hint="choose -o in a folder you can write",
            code="OUTPUT_UNWRITABLE",
        ) from None
    try:
        lock = _acquire_lock(parent, out.name)
    except OSError as exc:  # permission denied, read-only file system, full disk
        if _is_disk_full(exc):
            raise _disk_full(out) from None
        raise OutputError(
            f"cannot write in {parent}: {exc.strerror}",
            hint="choose -o in a folder you can write",
            code="OUTPUT_UNWRITABLE",
        ) from None
    staging = parent / f"{STAGING_PREFIX}{out.name}-{os.getpid()}-{secrets.token_hex(4)}"
    # The SIGTERM handler covers publishing and cleanup too, so that there is no window where the
    # default action (die without cleanup) is back in place.
    with _terminate_as_interrupt():
        try:
            _ACTIVE[staging] = lock
            _clean_leftovers(out)
            before = _input_state(inputs)
            staging.mkdir()
            yield staging
            _finish_output(staging, allow_nonfinite=allow_nonfinite)
            _check_inputs_unchanged(before)
            _finish(staging)
            # fsync while still interruptible: it can take a while for large outputs.
            _fsync_tree(staging)
            with _signals_deferred():
                # Re-check: something other than moetool may have created out (or a symlink) meanwhile.
                check_output_path(out, inputs, overwrite=overwrite)
                _publish(staging, out)
                _release_lock(lock)
                _ACTIVE.pop(staging, None)
        except BaseException as exc:
            written = _tree_bytes(staging) if staging.exists() else 0
            with _signals_deferred():
                _remove_tree(staging)
                _release_lock(lock)
                _ACTIVE.pop(staging, None)
            if isinstance(exc, Exception) and not isinstance(exc, MoetoolError) and _is_disk_full(exc):
                raise _disk_full(out, written=written) from None
            raise


def _finish(staging: Path) -> None:
    """Last steps before publishing: file modes as the umask allows, then the checksum manifest."""
    from moetool.io.manifest import write_manifest
    from moetool.io.permissions import apply_umask_modes

    apply_umask_modes(staging)  # before the manifest, which is then written with the right mode
    write_manifest(staging)


def _name_pid(name: str, prefix: str) -> int | None:
    # "<prefix><out name>-<pid>-<random>": the output name may itself contain dashes.
    parts = name[len(prefix) :].rsplit("-", 2)
    if len(parts) != 3:
        return None
    try:
        return int(parts[1])
    except ValueError:
        return None


def stale_staging_dirs(parent: Path) -> list[Path]:
    """Leftovers of killed runs in ``parent``, for a warning or an offer to clean up.

    Lists ``.moetool-tmp-*`` staging folders (an unfinished output) and ``.moetool-old-*`` folders (an
    earlier output that a run killed mid-swap had renamed aside) whose process is no longer alive.

    Args:
        parent: the folder that holds (or will hold) the output.

    Returns:
        The leftover folders, sorted by name; empty when ``parent`` does not exist.
    """
    parent = Path(parent)
    if not parent.is_dir():
        return []
    found: list[Path] = []
    for entry in sorted(parent.iterdir()):
        for prefix in (STAGING_PREFIX, OLD_PREFIX):
            if entry.name.startswith(prefix) and entry.is_dir() and not entry.is_symlink():
                pid = _name_pid(entry.name, prefix)
                if pid is None or not _pid_alive(pid):
                    found.append(entry)
    return found


# --------------------------------------------------------------------------------------------------
# Small files


def _open_new_for_write(path: Path, *, exclusive: bool = False) -> int:
    """Open ``path`` for writing without following a symlink planted there."""
    flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    flags |= os.O_EXCL if exclusive else os.O_TRUNC
    try:
        return os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OutputError(
                f"{path} is a symlink; moetool never writes through symlinks",
                hint="remove the symlink or choose another -o",
                code="OUTPUT_IS_SYMLINK",
            ) from None
        raise


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as UTF-8 JSON with two-space indent, keys in given order and a final newline.

    NaN and infinities are refused (``ValueError``): they are not JSON and break other readers.

    Args:
        path: the file to create or replace (never followed if it is a symlink).
        obj: a JSON-able object.
    """
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False, ensure_ascii=False) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write ``text`` as UTF-8 with ``\\n`` line ends, refusing to follow a symlink at ``path``.

    Args:
        path: the file to create or replace.
        text: the content.

    Raises:
        OutputError: ``path`` is a symlink (code ``OUTPUT_IS_SYMLINK``).
    """
    fd = _open_new_for_write(Path(path))
    with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
        handle.write(text)


def _aux_source_allowed(src_root: Path, target: Path) -> bool:
    """Whether a symlinked auxiliary file may be read: inside the model folder or its HF-cache blobs."""
    if _is_within(target, src_root):
        return True
    # HF cache: <repo>/snapshots/<sha>/tokenizer.json -> ../../blobs/<hash>
    return target.parent.name == "blobs" and target.parent.parent == src_root.parent.parent


def copy_aux_files(src: Path, dst: Path) -> list[str]:
    """Copy tokenizer, chat-template and generation files from a model folder to the output.

    Only top-level files matching :data:`AUX_FILE_PATTERNS` are copied; never ``config.json``,
    weights or ``README.md``. Symlinks (HF-cache snapshots) are followed for reading when they point
    inside the model folder or its cache ``blobs``; the copies are regular files. A file that already
    exists in ``dst`` (for example a ``generation_config.json`` the command wrote) is left alone.

    Args:
        src: the source model folder.
        dst: the (staging) output folder.

    Returns:
        The names copied, sorted.

    Raises:
        UnsafePathError: an auxiliary file is a symlink pointing outside the model folder.
    """
    src = Path(src)
    dst = Path(dst)
    src_root = src.resolve()
    copied: list[str] = []
    for entry in sorted(src.iterdir(), key=lambda p: p.name):
        name = entry.name
        if not any(fnmatch.fnmatchcase(name, pattern) for pattern in AUX_FILE_PATTERNS):
            continue
        target = entry.resolve()
        if entry.is_symlink() and not _aux_source_allowed(src_root, target):
            raise UnsafePathError(
                f"{entry} is a symlink to {target}, outside the model folder",
                hint="remove the symlink or copy the real file into the model folder",
            )
        if not target.is_file():
            continue
        destination = dst / name
        if destination.exists() or destination.is_symlink():
            continue
        fd = _open_new_for_write(destination, exclusive=True)
        with open(target, "rb") as reader, os.fdopen(fd, "wb") as writer:
            shutil.copyfileobj(reader, writer, length=1 << 20)
        copied.append(name)
    return copied


# --------------------------------------------------------------------------------------------------
# Sharded safetensors writing


@dataclass(frozen=True)
class WriteResult:
    """What :meth:`ShardedWriter.finalize` wrote.

    Attributes:
        files: the weight files and, when sharded, the index, in the order written.
        total_size: bytes of tensor data (the index's ``metadata.total_size``).
        num_tensors: number of tensors written.
    """

    files: list[str] = field(default_factory=list)
    total_size: int = 0
    num_tensors: int = 0


def _is_disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", -1)):
        return True
    # safetensors reports Rust I/O errors as SafetensorError with the OS message inside.
    text = str(exc)
    return "No space left" in text or "os error 28" in text or "StorageFull" in text


def _normalize_header_order(path: Path) -> None:
    """Rewrite a safetensors header with ``__metadata__`` keys sorted, in place.

    safetensors serialises the metadata from a Rust ``HashMap``, whose order changes from process to
    process; with more than one key the same tensors would give different bytes. The rewritten header
    holds the same keys and values, so it has the same length and the tensor data does not move.
    """
    with open(path, "r+b") as handle:
        length = int.from_bytes(handle.read(8), "little")
        raw = handle.read(length)
        header = json.loads(raw.decode("utf-8"))
        metadata = header.pop("__metadata__", None)
        if not metadata or len(metadata) < 2:
            return
        ordered = {"__metadata__": dict(sorted(metadata.items())), **header}
        new = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(new) > length:  # differing escapes; never move data, keep the valid original
            return
        handle.seek(8)
        handle.write(new + b" " * (length - len(new)))


#: safetensors dtype names of torch dtypes (``str(torch.float32)`` -> ``"F32"``).
SAFETENSORS_DTYPES = {
    "torch.float64": "F64",
    "torch.float32": "F32",
    "torch.bfloat16": "BF16",
    "torch.float16": "F16",
    "torch.float8_e4m3fn": "F8_E4M3",
    "torch.float8_e5m2": "F8_E5M2",
    "torch.int64": "I64",
    "torch.int32": "I32",
    "torch.int16": "I16",
    "torch.int8": "I8",
    "torch.uint64": "U64",
    "torch.uint32": "U32",
    "torch.uint16": "U16",
    "torch.uint8": "U8",
    "torch.bool": "BOOL",
}


class ShardedWriter:
    """Writes tensors into size-bounded safetensors shards as they arrive, then the index.

    Each tensor's bytes go to disk when it is added (into a data file beside the shard being filled),
    so memory holds no tensor data, whatever the shard size. When the next tensor would push the shard
    past ``max_shard_size``, the shard is closed: its header is written and the data copied after it
    (a kernel-side copy). A tensor larger than ``max_shard_size`` gets a shard of its own. Tensors keep
    the order they were added in, so the same input gives byte-identical shards. :meth:`finalize` names
    the files like ``save_pretrained``: ``model.safetensors`` when there is one shard, otherwise
    ``model-00001-of-0000N.safetensors`` plus ``model.safetensors.index.json``.

    Use it inside :func:`staged_output`. As a context manager it finalizes on a normal exit (the
    result is then in :attr:`result`) and removes its partial shards on an exception.

    Args:
        folder: where to write (created if missing).
        max_shard_size: bound on the tensor bytes per shard.
        metadata: extra string metadata for every shard header (``format: pt`` is always set).
    """

    def __init__(
        self,
        folder: Path,
        *,
        max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
        metadata: dict[str, str] | None = None,
    ) -> None:
        if max_shard_size <= 0:
            raise UsageError(f"max shard size must be positive, got {max_shard_size}")
        metadata = dict(metadata or {})
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise TypeError(f"safetensors metadata must map str to str, got {key!r}: {value!r}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        # Old weights or an old index beside the new ones would be loaded instead of (or mixed with)
        # them; the writer expects a fresh folder, normally the one from staged_output.
        existing = sorted(p.name for p in self.folder.glob("model*.safetensors*"))
        if existing:
            raise OutputError(
                f"{self.folder} already holds weight files ({', '.join(existing[:3])})",
                hint="write into an empty folder",
                code="OUTPUT_EXISTS",
            )
        self.max_shard_size = int(max_shard_size)
        # transformers refuses to load shards whose format is not "pt"; it cannot be overridden.
        self.metadata = dict(sorted({**metadata, "format": "pt"}.items()))
        self.result: WriteResult | None = None
        # The shard being filled: its data file, and (name, dtype, shape, start, end) per tensor.
        self._data: Any = None
        self._data_path: Path | None = None
        self._entries: list[tuple[str, str, list[int], int, int]] = []
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._names: set[str] = set()
        self._total_size = 0
        self._closed = False

    def __enter__(self) -> ShardedWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            if not self._closed:
                self.finalize()
        else:
            self.abort()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Write one tensor's bytes, closing the current shard first if this tensor would overflow it.

        Args:
            name: the tensor's name in the checkpoint.
            tensor: any dense tensor (moved to CPU; nothing of it is kept after the call).

        Raises:
            DuplicateTensorError: ``name`` was already added.
            MoetoolError: the writer was finalized, the tensor is on the meta device, or of a dtype
                safetensors cannot store.
            DiskFullError: writing ran out of space.
        """
        import torch

        if self._closed:
            raise MoetoolError("the writer is already finalized", code="WRITER_CLOSED")
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise MoetoolError(f"invalid tensor name {name!r}", code="INVALID_TENSOR_NAME")
        if name in self._names:
            raise DuplicateTensorError(f"tensor {name!r} was written twice")
        t = tensor.detach()
        if t.device.type == "meta":
            raise MoetoolError(f"tensor {name!r} has no data (meta device)", code="META_TENSOR")
        dtype = SAFETENSORS_DTYPES.get(str(t.dtype))
        if dtype is None:
            raise MoetoolError(f"tensor {name!r} has dtype {t.dtype}, which safetensors cannot store", code="DTYPE")
        if t.device.type != "cpu":
            t = t.to("cpu")
        t = t.contiguous()
        nbytes = t.numel() * t.element_size()
        if self._entries and self._pending_bytes + nbytes > self.max_shard_size:
            self._flush()
        if self._data is None:
            self._data_path = self.folder / f"{_SHARD_TMP_PREFIX}{len(self._shards) + 1:05d}.data"
            self._data = open(self._data_path, "wb")  # noqa: SIM115 - closed in _flush / abort
        start = self._pending_bytes
        if nbytes:
            raw = t.reshape(-1).view(torch.uint8).numpy()
            self._write(self._data, memoryview(raw), nbytes)
        self._entries.append((name, dtype, [int(d) for d in t.shape], start, start + nbytes))
        self._names.add(name)
        self._pending_bytes += nbytes
        self._total_size += nbytes

    def _write(self, handle: Any, data: Any, nbytes: int) -> None:
        try:
            handle.write(data)
        except OSError as exc:
            if _is_disk_full(exc):
                raise self._disk_full(nbytes) from None
            raise

    def _disk_full(self, nbytes: int) -> DiskFullError:
        free = shutil.disk_usage(self.folder).free
        return DiskFullError(
            f"disk full while writing shards in {self.folder}: needs {nbytes:,} more bytes, {free:,} free",
            hint="free some space or choose -o on another disk",
        )

    def _flush(self) -> None:
        """Close the shard being filled: header, then its data (copied from the data file)."""
        if self._data is None:
            return
        assert self._data_path is not None
        data_path, handle = self._data_path, self._data
        self._data = self._data_path = None
        handle.close()
        header: dict[str, Any] = {"__metadata__": self.metadata}
        for name, dtype, shape, start, end in self._entries:
            header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data start to 8 bytes
        path = self.folder / f"{_SHARD_TMP_PREFIX}{len(self._shards) + 1:05d}.safetensors"
        try:
            with open(path, "wb") as out, open(data_path, "rb") as source:
                self._write(out, len(raw).to_bytes(8, "little") + raw, len(raw) + 8)
                try:
                    shutil.copyfileobj(source, out, 16 * 2**20)
                except OSError as exc:
                    if _is_disk_full(exc):
                        raise self._disk_full(self._pending_bytes) from None
                    raise
        except BaseException:
            path.unlink(missing_ok=True)
            data_path.unlink(missing_ok=True)
            raise
        data_path.unlink(missing_ok=True)
        self._shards.append((path, [entry[0] for entry in self._entries]))
        self._entries = []
        self._pending_bytes = 0

    def finalize(self) -> WriteResult:
        """Write the last shard, give shards their final names and write the index when sharded.

        Returns:
            The files written, the total tensor bytes and the number of tensors.

        Raises:
            MoetoolError: no tensor was added (``NOTHING_TO_WRITE``) or already finalized.
        """
        if self._closed:
            raise MoetoolError("the writer is already finalized", code="WRITER_CLOSED")
        if not self._names:
            raise MoetoolError("no tensors were given to the writer", code="NOTHING_TO_WRITE")
        self._flush()
        self._closed = True
        count = len(self._shards)
        if count == 1:
            final = self.folder / SINGLE_SHARD_NAME
            os.replace(self._shards[0][0], final)
            files = [SINGLE_SHARD_NAME]
        else:
            weight_map: dict[str, str] = {}
            files = []
            for number, (path, names) in enumerate(self._shards, start=1):
                filename = f"model-{number:05d}-of-{count:05d}.safetensors"
                os.replace(path, self.folder / filename)
                files.append(filename)
                for tensor_name in names:
                    weight_map[tensor_name] = filename
            index = {
                "metadata": {"total_size": self._total_size},
                "weight_map": dict(sorted(weight_map.items())),
            }
            write_json(self.folder / INDEX_NAME, index)
            files.append(INDEX_NAME)
        self.result = WriteResult(files=files, total_size=self._total_size, num_tensors=len(self._names))
        return self.result

    def abort(self) -> None:
        """Drop the shard being filled and delete the shards written so far (idempotent)."""
        self._closed = True
        if self._data is not None:
            self._data.close()
            self._data = None
        if self._data_path is not None:
            self._data_path.unlink(missing_ok=True)
            self._data_path = None
        self._entries = []
        for path, _names in self._shards:
            path.unlink(missing_ok=True)
        self._shards = []
