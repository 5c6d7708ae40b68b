"""The versions of moetool and of the libraries that shape its outputs, read without importing them.

Every ``--json`` document and every model card records these, so a result can be traced to the code
that produced it. Package metadata is read with :mod:`importlib.metadata`: importing torch or
transformers just to ask their version would cost seconds and break the torch-free ``inspect`` path.
"""

from __future__ import annotations

import platform
from functools import cache
from importlib import metadata

__all__ = ["TRACKED_PACKAGES", "versions"]

# The libraries whose versions change what moetool writes or measures.
TRACKED_PACKAGES: tuple[str, ...] = ("torch", "transformers", "safetensors", "huggingface_hub")


def _installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


@cache
def _versions() -> tuple[tuple[str, str | None], ...]:
    from moetool import __version__

    found: list[tuple[str, str | None]] = [("moetool", __version__), ("python", platform.python_version())]
    found += [(name, _installed(name)) for name in TRACKED_PACKAGES]
    return tuple(found)


def versions() -> dict[str, str | None]:
    """Versions of moetool, Python and :data:`TRACKED_PACKAGES` (``None`` when not installed).

    Returns:
        A new dict, ``{"moetool": ..., "python": ..., "torch": ..., "transformers": ..., ...}``.
    """
    return dict(_versions())
