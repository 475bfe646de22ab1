"""Connecting to Ray: the same code on a laptop, in a Ray Job and on a cloud cluster.

Inside a Ray Job (RAY_ADDRESS is set) or with `cluster.address`, rayalign joins the existing
cluster; otherwise it starts a local Ray with the configured logical CPUs and object store.
"""

from __future__ import annotations

import os

from rayalign.config import ClusterConfig


def connect(config: ClusterConfig):
    """Initialise Ray once per process and return the `ray` module."""
    import ray

    if ray.is_initialized():
        return ray
    # Quiet, and no per-task progress noise from inside libraries; Ray Data's bars stay.
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    address = config.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return ray
    kwargs = {"include_dashboard": False}
    if config.num_cpus is not None:
        kwargs["num_cpus"] = config.num_cpus
    if config.object_store_memory_gb is not None:
        kwargs["object_store_memory"] = int(config.object_store_memory_gb * 1024**3)
    if not config.use_gpu:
        kwargs["num_gpus"] = 0
    ray.init(**kwargs)
    return ray
