"""Several processes (``accelerate launch``, ``torchrun``): each runs a share of the batches, results are summed.

Under ``accelerate launch --num_processes 8 -m moetool ...`` (one process per GPU) or ``torchrun
--nproc_per_node 2 -m moetool ...`` (CPU processes with the gloo backend), every process streams the same
layers over its own share of the calibration or profiling windows (:meth:`Ranks.shard`: window batch
``i`` goes to process ``i mod N``), so each process does 1/N of the work. What they measure is then summed
across processes (:meth:`Ranks.sum_`): routing counts, Hessians, losses. Every process ends with the same
totals; only the first one (:attr:`Ranks.is_main`) writes files and prints results.

accelerate's ``PartialState`` sets the processes up (NCCL between GPUs, gloo between CPU processes); a
single process needs none of it and pays nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import torch

T = TypeVar("T")


def launched_processes() -> int:
    """How many processes the launcher started (1 without a launcher)."""
    for key in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        value = os.environ.get(key)
        if value and value.isdigit():
            return int(value)
    return 1


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes of a run.

    Attributes:
        rank: 0 .. world - 1.
        world: the number of processes.
        local_rank: the rank on this machine (which GPU it uses).
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """The process that writes and reports."""
        return self.rank == 0

    def shard(self, items: Iterable[T]) -> Iterator[T]:
        """This process's share: items ``rank``, ``rank + world``, ... (all of them with one process)."""
        for index, item in enumerate(items):
            if index % self.world == self.rank:
                yield item

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over the processes, in place (every process gets the total)."""
        if self.world > 1:
            import torch.distributed as dist

            device = self._device()
            if tensor.device != device:  # NCCL sums GPU tensors only
                moved = tensor.to(device)
                dist.all_reduce(moved, op=dist.ReduceOp.SUM)
                tensor.copy_(moved)
            else:
                dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def sum_int(self, value: int) -> int:
        """Sum a Python integer over the processes."""
        if self.world == 1:
            return value
        import torch

        total = torch.tensor([value], dtype=torch.int64, device=self._device())
        return int(self.sum_(total).item())

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order (picklable objects; small ones: figures, not tensors)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        """Wait for every process."""
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def _device(self) -> Any:
        import torch
        import torch.distributed as dist

        backend = dist.get_backend()
        if "nccl" in str(backend) and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


_SINGLE = Ranks()


def current_ranks(device: str = "auto") -> Ranks:
    """The processes of this run, setting up their communication on first use.

    Args:
        device: the ``--device`` of the command: ``cpu`` makes the processes talk over gloo even on a
            machine with GPUs.
    """
    if launched_processes() <= 1:
        return _SINGLE
    import torch
    from accelerate import PartialState

    cpu = device.startswith("cpu") or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    return Ranks(rank=state.process_index, world=state.num_processes, local_rank=state.local_process_index)
