"""moetool: a toolkit for Mixture-of-Experts checkpoints in the Hugging Face format.

Importing the package is cheap: torch and transformers are imported only by the functions that run
a model or touch tensor data.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
