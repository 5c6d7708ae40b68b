"""Checkpoint I/O: resolving a model source, validated reading, streaming sharded writing."""
