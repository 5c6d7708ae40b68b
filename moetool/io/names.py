"""File names of a Hugging Face checkpoint folder, in one place (the readers and the writer share them)."""

from __future__ import annotations

__all__ = ["CONFIG_NAME", "INDEX_NAME", "PICKLE_SUFFIXES", "SINGLE_FILE_NAME"]

CONFIG_NAME = "config.json"
#: The weights of an unsharded checkpoint.
SINGLE_FILE_NAME = "model.safetensors"
#: The index of a sharded checkpoint (``weight_map``: tensor name -> shard file).
INDEX_NAME = "model.safetensors.index.json"
#: Weight files that hold pickled data, which moetool never loads.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
