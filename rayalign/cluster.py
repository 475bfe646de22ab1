"""Connecting to Ray: the same code on a laptop, in a Ray Job and on a cloud cluster.

Inside a Ray Job (RAY_ADDRESS is set) or with `cluster.address` (`auto` for a cluster started
with `ray start` on this machine), rayalign joins the existing cluster; otherwise it starts a
local Ray with the configured logical CPUs and object store.
"""

from __future__ import annotations

import os

from rayalign.config import ClusterConfig, ConfigError


def in_job() -> bool:
    """True when this process is a Ray Job's entrypoint (or a task of one)."""
    return "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ or "RAY_JOB_ID" in os.environ


def check_shared_paths(config) -> None:
    """Inside a Ray Job, outputs written by tasks on other nodes must go to storage every node
    sees: a relative path would land in each node's own copy of the working directory."""
    if not in_job():
        return
    paths = {"run_dir": config.run_dir, "clair.output": config.clair.output, "train.output": config.train.output,
             "reference.output": config.reference.output, "serve.output": config.serve.output,
             "eval.output": config.eval.output, "train.storage_path": config.train.storage_path}
    for key, path in paths.items():
        if path is not None and "://" not in path and not os.path.isabs(os.path.expanduser(path)):
            raise ConfigError(f"{key}: {path!r} must be absolute (on storage every node sees) when running as a "
                              f"Ray Job")


def connect(config: ClusterConfig):
    """Initialise Ray once per process and return the `ray` module."""
    import ray

    if ray.is_initialized():
        return ray
    # Quiet, and no per-task progress noise from inside libraries; Ray Data's bars stay.
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # Inside a Ray Job the job's own cluster is the truth; elsewhere the config names it.
    address = (os.environ.get("RAY_ADDRESS") or config.address) if in_job() else (config.address or
                                                                                  os.environ.get("RAY_ADDRESS"))
    if address:
        ray.init(address=address, log_to_driver=True)
        return ray
    # address="local" starts a new local Ray even when a `ray start` cluster runs on this
    # machine: joining one is explicit (cluster.address: auto, or RAY_ADDRESS).
    # The dashboard serves Ray's state API, which Ray Train's placement-group cleaner asks every
    # second; without it each question fails with a logged warning for the whole training.
    kwargs = {"address": "local", "include_dashboard": True}
    if config.num_cpus is not None:
        kwargs["num_cpus"] = config.num_cpus
    if config.object_store_memory_gb is not None:
        kwargs["object_store_memory"] = int(config.object_store_memory_gb * 1024**3)
    if not config.use_gpu:
        kwargs["num_gpus"] = 0
    ray.init(**kwargs)
    return ray
