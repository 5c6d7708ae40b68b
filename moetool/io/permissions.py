"""File modes of an output folder: every file as readable as the user's umask allows.

Libraries do not agree on the mode of a new file. safetensors 0.8's ``save_file`` (and so
transformers' ``save_pretrained``) creates weight files as 0600 (a private temporary file renamed into
place), while ``open()`` gives 0644 under the usual umask 022. An output whose weights only their owner
can read breaks a server or a colleague running as another user. Before an output is published,
:func:`apply_umask_modes` gives every file and folder the mode a plain ``open()`` or ``mkdir()`` would
have given it: 0666 or 0777 minus the umask.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

__all__ = ["apply_umask_modes", "umask_modes"]


def umask_modes(folder: Path) -> tuple[int, int]:
    """The modes a new file and a new folder get in ``folder`` under the current umask.

    The umask is read by creating a probe file, not with ``os.umask``: setting the umask to read it
    back would change it for every thread of the process in between.

    Args:
        folder: an existing folder the process can write (the staging folder).

    Returns:
        ``(file_mode, folder_mode)``, e.g. ``(0o644, 0o755)`` under umask 022.
    """
    probe = Path(folder) / f".moetool-umask-{secrets.token_hex(4)}"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o666)
    try:
        file_mode = stat.S_IMODE(os.fstat(fd).st_mode) & 0o666
    finally:
        os.close(fd)
        probe.unlink(missing_ok=True)
    # A folder too: a file's mode cannot show the umask's execute bits.
    probe.mkdir(mode=0o777)
    try:
        folder_mode = stat.S_IMODE(probe.stat().st_mode) & 0o777
    finally:
        probe.rmdir()
    return file_mode, folder_mode


def apply_umask_modes(folder: Path) -> int:
    """Give every file below ``folder`` mode 0666 & ~umask and every folder 0777 & ~umask.

    Symlinks are left alone (their targets are not ours to change).

    Args:
        folder: the output folder (normally the staging folder, before it is published).

    Returns:
        The number of files and folders whose mode changed.
    """
    folder = Path(folder)
    file_mode, folder_mode = umask_modes(folder)
    changed = 0
    for dirpath, dirnames, filenames in os.walk(folder):
        entries = [(Path(dirpath, name), folder_mode) for name in dirnames]
        entries += [(Path(dirpath, name), file_mode) for name in filenames]
        for path, mode in entries:
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                continue
            if stat.S_IMODE(info.st_mode) != mode:
                os.chmod(path, mode)
                changed += 1
    if stat.S_IMODE(folder.lstat().st_mode) != folder_mode:
        os.chmod(folder, folder_mode)
        changed += 1
    return changed
