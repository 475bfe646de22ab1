"""Where a local Ray's processes run beside a CPU engine: off the CPUs vLLM binds its model
worker to, so that Ray's own processes and the engine's scheduler do not take turns with the
worker on its CPUs."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from rayalign.config import ServeConfig
from rayalign.llm import engine_kwargs

# vLLM's CPU build binds its model workers' threads to the CPUs this lists ("auto" by default).
OMP_BIND = "VLLM_CPU_OMP_THREADS_BIND"


@contextlib.contextmanager
def ray_kept_off_engine_cpus(serve_cfg: ServeConfig, owns_ray: bool):
    """Around starting a local Ray for CPU engines: yields (the model workers' CPUs, the others),
    or None where it does nothing.

    The workers get the CPUs vLLM binds them to by default, named in OMP_BIND, and this process
    moves to the others, so that Ray's processes, all started from here, inherit them. Otherwise
    Ray's own processes (GCS, raylet and the dashboard at niceness 0, above the engine's 15) and
    the engine's scheduler take turns on the workers' CPUs, and each decoding step waits for
    them: about a tenth of the throughput on two cores (BENCHMARKS.md)."""
    split = _engine_split(serve_cfg) if owns_ray else None
    before = _thread_affinities() if split else {}
    if split:
        try:
            os.sched_setaffinity(0, split[1])  # this thread first: it starts Ray
        except OSError:  # CPUs this process may not use after all
            split = None
    if split:
        for thread in before:
            _set_affinity(thread, set(split[1]))
        os.environ[OMP_BIND] = ",".join(map(str, split[0]))
    try:
        yield split
    finally:
        if split:
            os.environ.pop(OMP_BIND, None)
            for thread, cpus in before.items():
                _set_affinity(thread, cpus)


def _engine_split(serve_cfg: ServeConfig) -> tuple[list[int], list[int]] | None:
    from rayalign.cluster import engine_core_split

    kwargs = engine_kwargs(serve_cfg.engine)
    workers = 1
    for key in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
        workers *= int(kwargs.get(key, 1))
    # A user's own binding, reserve or memory nodes change what vLLM chooses: leave it to them.
    chosen = {OMP_BIND, "VLLM_CPU_NUM_OF_RESERVED_CPU", "CPU_VISIBLE_MEMORY_NODES"} & set(os.environ)
    if (not serve_cfg.isolate_engine_cores or serve_cfg.engine.gpus_per_engine or workers != 1 or chosen
            or not hasattr(os, "sched_setaffinity")):
        return None
    return engine_core_split()


def _thread_affinities() -> dict[int, set[int]]:
    found = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            found[int(task.name)] = os.sched_getaffinity(int(task.name))
        except OSError:  # ended meanwhile
            pass
    return found


def _set_affinity(thread: int, cpus: set[int]) -> None:
    try:
        os.sched_setaffinity(thread, cpus)
    except OSError:  # ended meanwhile
        pass
