"""Dense to Mixture-of-Experts upcycling, exact at initialisation (``moetool upcycle``).

Modules, one job each: :mod:`~moetool.upcycle.plan` (options, checks and the frozen plan),
:mod:`~moetool.upcycle.config` (the target config.json), :mod:`~moetool.upcycle.tensors` (streaming
conversion), :mod:`~moetool.upcycle.router_init` (random / zeros / k-means routers),
:mod:`~moetool.upcycle.symmetry` (noise, Drop-Upcycling), :mod:`~moetool.upcycle.verify` (checks
against the dense model) and :mod:`~moetool.upcycle.api` (:func:`upcycle`). Nothing here imports
torch at module import.
"""

from moetool.errors import VerificationError
from moetool.upcycle.api import UpcycleResult, upcycle
from moetool.upcycle.plan import UpcycleOptions, UpcyclePlan, build_plan

__all__ = [
    "UpcycleOptions",
    "UpcyclePlan",
    "UpcycleResult",
    "VerificationError",
    "build_plan",
    "upcycle",
]
