"""The layer-streamed runner: models run one decoder layer at a time, whatever their size.

See :mod:`moetool.runner.stream` (the entry point, :class:`StreamedModel`),
:mod:`moetool.runner.schedule` (layer-major execution) and :mod:`moetool.runner.skeleton` (the
weightless model and its weights, piece by piece).
"""

from moetool.runner.schedule import BatchInput, LayerSchedule, LayerStep
from moetool.runner.stream import StreamedModel, StreamOptions, iter_segments

__all__ = ["BatchInput", "LayerSchedule", "LayerStep", "StreamOptions", "StreamedModel", "iter_segments"]
