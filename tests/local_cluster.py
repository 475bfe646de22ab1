"""A real multi-node Ray cluster on this machine, started with `ray start`, for the cluster tests.

Every node is a `ray start --block` process in its own session, so that the cluster can be
stopped by killing exactly the processes it started (the `ray start` processes and their
descendants: GCS, raylets, dashboard, workers, engines). `ray stop` is not used: it stops every
Ray on the machine, and other clusters run here. Ports that Ray would otherwise take from a
fixed default (GCS 6379, dashboard 8265, client server 10001, dashboard agent 52365, worker
ports 10002-19999) are chosen free, and the temp dir is private, so nothing collides with
another Ray instance.

Token authentication stays on: the cluster is started with RAY_AUTH_MODE=token and a token made
for it; clients send it as a header (`headers`), and the job driver inherits it from its node.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

from rayalign.cluster import free_port, haproxy_env

RAY = str(Path(sys.executable).with_name("ray"))


class LocalCluster:
    def __init__(self, env: dict[str, str] | None = None):
        # Short: Ray's Unix sockets live under the temp dir and their paths are capped at 107 bytes.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rayalign-cl-", dir="/tmp"))
        self.token = secrets.token_hex(24)
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.env = {**os.environ, **haproxy_env(), **(env or {}),
                    "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token,
                    # Entry points such as `rayalign` resolve in the job's shell from this PATH.
                    "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
        self.env.pop("RAY_ADDRESS", None)
        self.nodes: list[subprocess.Popen] = []

    @property
    def gcs_address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def _common(self, num_cpus: int, resources: dict[str, float]) -> list[str]:
        return ["--block", "--node-ip-address", "127.0.0.1", "--num-cpus", str(num_cpus), "--num-gpus", "0",
                "--resources", json.dumps(resources), "--dashboard-agent-listen-port", str(free_port()),
                "--min-worker-port", "0", "--max-worker-port", "0", "--disable-usage-stats",
                "--object-store-memory", str(512 * 1024**2)]

    def _start(self, args: list[str], name: str, extra_env: dict[str, str] | None = None) -> None:
        log = open(self.temp_dir / f"{name}.log", "w")
        proc = subprocess.Popen([RAY, "start", *args], stdout=log, stderr=subprocess.STDOUT,
                                env={**self.env, **(extra_env or {})}, start_new_session=True)
        self.nodes.append(proc)

    def start_head(self, num_cpus: int, resources: dict[str, float], autoscaling_config: Path | None = None,
                   extra_env: dict[str, str] | None = None) -> None:
        args = ["--head", "--port", str(self.gcs_port), "--temp-dir", str(self.temp_dir),
                "--include-dashboard", "true", "--dashboard-host", "127.0.0.1",
                "--dashboard-port", str(self.dashboard_port), "--ray-client-server-port", str(free_port()),
                *self._common(num_cpus, resources)]
        if autoscaling_config is not None:
            args.append(f"--autoscaling-config={autoscaling_config}")
        self._start(args, "head", extra_env)
        self.wait_for_nodes(1)

    def add_worker(self, num_cpus: int, resources: dict[str, float]) -> None:
        # A temp dir of its own, as on a real machine: nodes sharing one would also share the
        # runtime env directory, where one node's unpacking of a working_dir replaces the copy
        # another node's job is running in.
        name = f"worker{len(self.nodes)}"
        count = len(self.alive_nodes())
        self._start(["--address", self.gcs_address, "--temp-dir", str(self.temp_dir / name),
                     *self._common(num_cpus, resources)], name)
        self.wait_for_nodes(count + 1)

    def get(self, path: str) -> dict:
        request = urllib.request.Request(self.dashboard_url + path, headers=self.headers)
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)

    def alive_nodes(self) -> list[dict]:
        """Alive nodes from the state API: node_id, resources_total, labels, is_head_node."""
        nodes = self.get("/api/v0/nodes?limit=1000&detail=1")["data"]["result"]["result"]
        return [n for n in nodes if n["state"] == "ALIVE"]

    def wait_for_nodes(self, count: int, timeout_s: float = 120) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while True:
            for proc in self.nodes:
                if proc.poll() is not None:
                    raise RuntimeError(f"a `ray start` exited ({proc.returncode}): {self.logs()}")
            try:
                nodes = self.alive_nodes()
                if len(nodes) == count:
                    return nodes
            except (OSError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster did not reach {count} alive nodes in {timeout_s:.0f} s: {self.logs()}")
            time.sleep(1)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(self.temp_dir.glob("*.log")))

    def processes(self) -> list[psutil.Process]:
        """The `ray start` processes, their descendants, and any process that left the tree but
        carries this cluster's token in its environment (nothing else has it)."""
        procs = {}
        for node in self.nodes:
            try:
                root = psutil.Process(node.pid)
                procs.update({p.pid: p for p in [root, *root.children(recursive=True)]})
            except psutil.NoSuchProcess:
                pass
        mark = f"RAY_AUTH_TOKEN={self.token}".encode()
        for pid in psutil.pids():
            try:
                if pid not in procs and mark in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    procs[pid] = psutil.Process(pid)
            except (OSError, psutil.NoSuchProcess):
                pass
        return list(procs.values())

    def stop(self) -> None:
        """SIGTERM this cluster's processes, then SIGKILL what is left after 20 s."""
        procs = self.processes()
        for proc in procs:
            try:
                proc.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=20)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        for node in self.nodes:
            node.wait(10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
