"""Reduce the routed experts of an MoE checkpoint (N to M), or aggregate them into one dense FFN.

What merging needs to know per family lives in the registry (``FamilySpec.merge``, a
:class:`moetool.arch.spec.MergeTraits`). Small modules, each with one job: :mod:`~moetool.merge.layout`
(expert and router tensors in and out of the family's on-disk layout), :mod:`~moetool.merge.calibrate`
(one pass over calibration text),
:mod:`~moetool.merge.scores`, :mod:`~moetool.merge.grouping`, :mod:`~moetool.merge.align`,
:mod:`~moetool.merge.combine` and :mod:`~moetool.merge.router` (pure functions over tensors),
:mod:`~moetool.merge.plan` (what is kept or merged, and the tensors that will be written) and
:mod:`~moetool.merge.api` (:func:`~moetool.merge.api.merge`, the entry point).
"""

from moetool.merge.api import DENSE_STRATEGIES, METHODS, MergeOptions, MergeResult, merge

__all__ = ["DENSE_STRATEGIES", "METHODS", "MergeOptions", "MergeResult", "merge"]
