"""CPU threads for the ``repae`` command: a choice that does not collapse on a shared machine.

Why: torch's CPU kernels split each operation over ``torch.get_num_threads()`` OpenMP threads (one per core by
default) and wait for the slowest. On a machine where another process keeps one core busy (a shared workstation, a
login node, a second job), one of those threads runs at a fraction of a core, and the others spin at the barrier
(libgomp's default wait policy). Measured on 2 cores with one competing busy process (benchmarks/cpu_threads.py,
docs/performance.md, "CPU threads"): torch's defaults (2 threads) trained the quickstart 4.6x slower than idle (the
issue that asked for this saw up to 28x on a busier machine); one thread with the passive wait policy 1.2x.

What the command does, before torch is imported (OpenMP reads its settings when it loads):

- ``OMP_WAIT_POLICY=PASSIVE``: a thread that waits sleeps instead of spinning, so waiting never steals the core
  the slow thread needs;
- ``OMP_NUM_THREADS`` = :func:`choose_threads` of the machine's cores (what the process may run on, not the load, so
  the same machine always gets the same count and a run's numbers are reproducible).

Each is set only when the user has not set it; ``REPAE_CPU_THREADS=N`` sets the count, ``REPAE_CPU_THREADS=torch``
leaves torch's own defaults alone. ``torchrun`` sets ``OMP_NUM_THREADS=1`` per process, which is kept. The Python
API changes nothing: a library does not set a process's threads; call ``torch.set_num_threads`` yourself.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

__all__ = ["ENV", "choose_threads", "configure_cpu_threads"]

ENV = "REPAE_CPU_THREADS"
"""``N`` (a thread count), ``auto`` (the default: :func:`choose_threads`) or ``torch`` (leave torch's defaults)."""


def usable_cores() -> int:
    """The physical cores this process may run on (its CPU affinity: a cgroup or ``taskset`` limit counts; SMT
    siblings count once, as torch's own default does), at least 1."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topology = f"/sys/devices/system/cpu/cpu{cpu}/topology"
        try:
            with open(f"{topology}/physical_package_id") as package, open(f"{topology}/core_id") as core:
                cores.add((package.read().strip(), core.read().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))  # no topology: a logical CPU counts as a core
    return max(1, len(cores))


def choose_threads(cores: int) -> int:
    """Intra-op threads for ``cores`` usable cores: all of them but one, from 3 cores up; one on 1-2 cores.

    Leaving one core free means one competing process costs a thread's share instead of stalling every operation at
    its slowest thread. The price is on an idle machine: on 2 cores the quickstart's steps take 1.3x as long with one
    thread as with two (benchmarks/cpu_threads.py); two threads with the passive policy were slower still idle
    (sleeping threads wake late for small operations), and spinning two threads collapse under load."""
    return max(1, cores - 1) if cores >= 3 else 1


def configure_cpu_threads(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set ``OMP_WAIT_POLICY`` and ``OMP_NUM_THREADS`` in ``environ`` (``os.environ``) where the user has not; return
    what was set. Must run before torch is imported to take effect. A bad ``REPAE_CPU_THREADS`` is a
    :class:`repae.errors.UserError` naming the accepted values."""
    env = os.environ if environ is None else environ
    choice = env.get(ENV, "auto").strip().lower() or "auto"
    if choice == "torch":
        return {}
    if choice == "auto":
        threads = choose_threads(usable_cores())
    else:
        try:
            threads = int(choice)
        except ValueError:
            threads = 0
        if threads < 1:
            from repae.errors import UserError

            raise UserError(f"{ENV}={env[ENV]!r} is not a thread count; use a whole number >= 1, 'auto' (the "
                            "default) or 'torch' (torch's own defaults)")
    wanted = {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": str(threads)}
    set_now = {key: value for key, value in wanted.items() if key not in env}
    env.update(set_now)
    return set_now
