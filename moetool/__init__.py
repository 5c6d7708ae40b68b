"""moetool: a toolkit for Mixture-of-Experts checkpoints in the Hugging Face format.

Importing the package is cheap: torch and transformers are imported only by the functions that run
a model or touch tensor data.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "load_model"]


def __getattr__(name: str) -> Any:
    # ``moetool.load_model`` is :func:`moetool.modeling.load_model`, imported on first use so that importing
    # the package stays cheap.
    if name == "load_model":
        from moetool.modeling import load_model

        return load_model
    raise AttributeError(f"module 'moetool' has no attribute {name!r}")
