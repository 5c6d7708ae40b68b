"""Knowledge distillation of an MoE teacher into a dense student of the teacher's family.

Small modules, each with one job: :mod:`~moetool.distill.options` (the settings and their checks, no
torch), :mod:`~moetool.distill.loss` (the KD + cross-entropy loss, full-vocabulary and top-k cached),
:mod:`~moetool.distill.schedule` (learning rate per step), :mod:`~moetool.distill.data` (training
windows, their order and the held-out split), :mod:`~moetool.distill.student` (the student at
initialisation), :mod:`~moetool.distill.teacher_cache` (the teacher's top-k log-probabilities on disk),
:mod:`~moetool.distill.checkpoint` (resumable training state, safetensors + JSON, no pickle),
:mod:`~moetool.distill.train` (the Accelerator loop) and :mod:`~moetool.distill.api`
(:func:`~moetool.distill.api.distill`, the entry point).
"""

from moetool.distill.api import DistillResult, distill
from moetool.distill.options import INIT_STRATEGIES, DistillOptions

__all__ = ["INIT_STRATEGIES", "DistillOptions", "DistillResult", "distill"]
