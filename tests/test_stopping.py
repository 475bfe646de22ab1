"""Stopping a command: SIGTERM (what `kill` sends; Ctrl-C takes the same path) while it starts its
Ray ends it within seconds, says so in one line without a traceback, and leaves no process of
the Ray it started. (`rayalign serve` in the foreground: tests/test_real_model.py.)"""

import os
import subprocess
import time

import psutil
import yaml

from rayalign import records
from rayalign.tasks import addition_prompts
from tests.conftest import PYTHON, ROOT, kill_command


def test_sigterm_while_clair_starts_its_ray_stops_it_and_leaves_nothing(tmp_path, tiny_model):
    records.write_rows(addition_prompts(4, seed=3), tmp_path / "prompts", "jsonl")
    config = {"run_dir": str(tmp_path / "run"), "cluster": {"num_cpus": 4},
              "clair": {"prompts": str(tmp_path / "prompts"), "target_model": str(tiny_model),
                        "engine": {"dtype": "float32", "max_model_len": 256, "gpu_memory_utilization": 0.1}}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own Ray, not the session's
    log = tmp_path / "clair.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([PYTHON, "-m", "rayalign.cli", "clair", "--config", str(tmp_path / "run.yaml")],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    tree: list[psutil.Process] = []
    try:
        # Start-up under way: the raylet runs and has begun starting its agents.
        deadline = time.time() + 120
        while not any(p.name().startswith("ray::") for p in tree):
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
            tree = _tree(proc.pid)
        assert "raylet" in {p.name() for p in tree}
        tree = _tree(proc.pid)
        stopped = time.time()
        proc.terminate()
        assert proc.wait(60) == 130, log.read_text()[-3000:]
        seconds = time.time() - stopped
        text = log.read_text()
        assert "rayalign clair: stopped" in text and "Traceback" not in text, text[-3000:]
        _, alive = psutil.wait_procs(tree, timeout=5)
        assert not alive, [f"{p.pid} {p.name()}" for p in alive]
        assert seconds < 30, f"stopping took {seconds:.0f} s"
    finally:
        kill_command(proc, tree)


def _tree(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
