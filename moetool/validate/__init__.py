"""Check a checkpoint before any work: config types and values, tensors against the family registry.

Every command runs the same checks before it computes anything (and before ``quantize`` imports
torch), so a bad input costs a fraction of a second and one line, never a crash half-way or an
output that transformers refuses:

* **config.json types and values**: the integer fields of the family's dims are integers (``160.0``
  and ``"8"`` are refused, with the JSON path), sizes are plausible, top-k lies in 1..experts,
  DeepSeek-style groups divide the experts, and the common transformers fields have their types;
* **tensors against the config**: every tensor the registry's templates imply
  (:func:`moetool.arch.plan.planned_tensors`) is stored, with the shape the config implies (router
  rows = experts, expert shapes, fused layouts, hidden size); a missing single expert tensor is named
  with its layer and expert;
* **float weights**, for commands that rewrite them: FP8, packed or otherwise quantized inputs are
  named as such;
* **values** (:func:`check_input`, opt-in because it reads every byte): NaN and Inf.

:func:`validate_checkpoint` returns :class:`Finding` objects (``inspect`` shows them as warnings);
:func:`check_input` and :func:`preflight` raise the first error as a typed
:class:`~moetool.errors.MoetoolError`. Nothing here imports torch; numpy only for the value scan.
"""

from moetool.validate.check import check_input, preflight
from moetool.validate.config import validate_config
from moetool.validate.findings import ERROR, FATAL, WARNING, Finding, Validation, as_error
from moetool.validate.tensors import validate_checkpoint
from moetool.validate.transformers_config import check_transformers_config, transformers_config_findings

__all__ = [
    "ERROR",
    "FATAL",
    "WARNING",
    "Finding",
    "Validation",
    "as_error",
    "check_input",
    "check_transformers_config",
    "preflight",
    "transformers_config_findings",
    "validate_checkpoint",
    "validate_config",
]
