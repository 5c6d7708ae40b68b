"""One CPU thread policy for every command that runs torch on the CPU.

torch starts as many OpenMP threads as there are cores, and every parallel operation waits for all of
them. When other processes hold some of those cores, the threads that got a core spin while the others
wait for a time slice, at every operation: on this project's 2-core machine beside other jobs,
``moetool quantize`` took 91-111 s with torch's default against 28.6 s with one thread, and distill
trained 5-10x slower on two threads than on one. So by default a command uses the cores that are idle
when it starts, at least one:

* ``--threads N`` (N >= 1) uses N threads, whatever the load;
* otherwise ``OMP_NUM_THREADS``, when set, is the user's choice and is kept;
* otherwise the idle cores: the cores this process may run on (CPU affinity, capped by a cgroup CPU
  quota) less the CPU time other processes used over a short sample (``/proc/stat``, 0.1 s), rounded;
  where ``/proc/stat`` is missing (not Linux), less the 1-minute load average. Processes started
  together by a launcher (``LOCAL_WORLD_SIZE``) share them.

Nothing here imports torch at module level (``moetool --help`` must not).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

#: How long the CPU load is sampled before a command picks its thread count.
SAMPLE_SECONDS = 0.1

#: The environment variable whose value the default policy keeps (torch reads it at start too).
ENV_VAR = "OMP_NUM_THREADS"


@dataclass(frozen=True)
class ThreadChoice:
    """The thread count a command runs with, and why.

    Attributes:
        threads: torch intra-op threads.
        source: ``--threads``, ``OMP_NUM_THREADS`` or ``idle cores``.
        cores: cores this process may use.
        idle: idle cores measured (``None`` when not measured).
    """

    threads: int
    source: str
    cores: int
    idle: float | None = None

    def describe(self) -> str:
        """One line for a command's plan, e.g. ``1 CPU thread (idle cores: 0.9 of 2)``."""
        noun = "thread" if self.threads == 1 else "threads"
        if self.source == "idle cores" and self.idle is not None:
            why = f"idle cores: {self.idle:.1f} of {self.cores}"
        elif self.source == ENV_VAR:
            why = f"{ENV_VAR}={os.environ.get(ENV_VAR, '')}"
        else:
            why = self.source
        return f"{self.threads} CPU {noun} ({why})"


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup v2/v1 CPU quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota)))
    return max(1, cores)


def _cgroup_quota() -> float | None:
    """CPUs allowed by the cgroup's CPU quota (``None``: no quota, or not readable)."""
    try:
        text = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
        return None
    except (OSError, ValueError, IndexError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def _cpu_times(cpus: set[int]) -> tuple[int, int] | None:
    """(busy, total) jiffies summed over ``cpus`` from ``/proc/stat``; ``None`` where unreadable."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    busy = total = 0
    seen = False
    for line in lines:
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu":
            continue
        try:
            index = int(name[3:])
            fields = [int(x) for x in rest.split()]
        except ValueError:
            continue
        if index not in cpus or len(fields) < 4:
            continue
        seen = True
        # user nice system idle iowait irq softirq steal (guest time is already inside user/nice)
        ticks = sum(fields[:8])
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        busy += ticks - idle
        total += ticks
    return (busy, total) if seen else None


def idle_cores(sample_seconds: float = SAMPLE_SECONDS) -> float:
    """Idle cores now: usable cores less the CPU other processes use, measured over ``sample_seconds``.

    This process sleeps during the sample, so it counts only the others. Where ``/proc/stat`` cannot be
    read, the 1-minute load average stands in (it lags: it still counts a job that just ended).
    """
    cores = usable_cores()
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:
        cpus = set()
    first = _cpu_times(cpus) if cpus else None
    if first is not None:
        time.sleep(sample_seconds)
        second = _cpu_times(cpus)
        if second is not None and second[1] > first[1]:
            busy_share = (second[0] - first[0]) / (second[1] - first[1])  # of the affinity CPUs
            return max(0.0, min(float(cores), cores - busy_share * len(cpus)))
    try:
        return max(0.0, cores - os.getloadavg()[0])
    except (OSError, AttributeError):
        return float(cores)


def _env_threads() -> int | None:
    value = os.environ.get(ENV_VAR, "").strip()
    try:
        count = int(value)
    except ValueError:
        return None
    return count if count >= 1 else None


def choose_threads(requested: int = 0) -> ThreadChoice:
    """The thread count for a command: ``requested`` if positive, else ``OMP_NUM_THREADS``, else idle cores."""
    cores = usable_cores()
    if requested and requested > 0:
        return ThreadChoice(requested, "--threads", cores)
    env = _env_threads()
    if env is not None:
        return ThreadChoice(env, ENV_VAR, cores)
    # Processes started together on this machine (torchrun, accelerate launch) share the idle cores.
    idle = idle_cores() / _local_processes()
    return ThreadChoice(max(1, min(cores, int(idle + 0.5))), "idle cores", cores, round(idle, 2))


def _local_processes() -> int:
    """Processes a launcher started on this machine (``LOCAL_WORLD_SIZE``; 1 without a launcher)."""
    value = os.environ.get("LOCAL_WORLD_SIZE", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else 1


_saved: list[int] = []


def apply_threads(requested: int = 0) -> ThreadChoice:
    """Choose the thread count (:func:`choose_threads`) and set it for torch in this process.

    The count in force before is kept: :func:`restore_threads` puts it back (the CLI does when a command
    ends, so that in-process callers such as tests keep their own setting).
    """
    import torch

    choice = choose_threads(requested)
    _saved.append(torch.get_num_threads())
    torch.set_num_threads(choice.threads)
    return choice


def restore_threads() -> None:
    """Undo every :func:`apply_threads` not undone yet (a no-op when there is none)."""
    if not _saved:
        return
    import torch

    first = _saved[0]
    _saved.clear()
    torch.set_num_threads(first)


@contextlib.contextmanager
def thread_count(count: int | None) -> Iterator[None]:
    """Run with ``count`` torch threads (``None`` or 0: leave the setting alone), restoring it after."""
    if not count:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
