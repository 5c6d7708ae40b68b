"""Derive family layouts from the installed transformers (imports torch; never on inspect's path).

``python -m moetool.arch.derive`` builds every MoE model type of the installed transformers on the meta
device, reads the tensors ``save_pretrained`` would write, fits each shape as a function of config
fields, and writes the torch-free table :mod:`moetool.arch.derived` reads
(``moetool/arch/data/derived_families.json``). See docs/ARCHITECTURE-families.md.
"""
