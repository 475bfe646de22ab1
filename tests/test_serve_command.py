"""`rayalign serve` as a user runs it in a terminal: a command that starts its own local Ray,
serves until it is told to stop, then removes its application and stops that Ray, leaving no
process behind."""

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import psutil
import pytest

from rayalign.cluster import engine_core_split
from tests.conftest import PYTHON, free_port, kill_command
from tests.serve_fixtures import ENGINE

pytestmark = pytest.mark.integration

RAYALIGN = str(Path(PYTHON).with_name("rayalign"))


def wait_for_line(proc: subprocess.Popen, log: Path, text: str, timeout: float) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = log.read_text()
        if text in out:
            return out
        if proc.poll() is not None:
            raise AssertionError(f"rayalign serve exited with {proc.returncode}:\n{out[-3000:]}")
        time.sleep(2)
    raise AssertionError(f"no {text!r} after {timeout} s:\n{log.read_text()[-3000:]}")


def thread_cpus(processes: list[psutil.Process]) -> set[frozenset[int]]:
    """The distinct CPU sets that the threads of `processes` may run on."""
    found = set()
    for process in processes:
        try:
            threads = process.threads()
        except psutil.NoSuchProcess:
            continue
        for thread in threads:
            try:
                found.add(frozenset(os.sched_getaffinity(thread.id)))
            except OSError:  # ended meanwhile
                pass
    return found


def test_serve_command_serves_until_sigterm_then_stops_its_ray(tiny_model, tmp_path):
    port = free_port()
    # Its own local Ray, not the test session's (whose address the session may have exported).
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    cmd = [RAYALIGN, "serve", "--model", f"tiny={tiny_model}", f"run_dir={tmp_path / 'run'}",
           f"serve.port={port}", "serve.ready_timeout_s=500", "cluster.num_cpus=6",
           f"serve.engine={json.dumps(ENGINE)}"]
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    tree: list[psutil.Process] = []
    try:
        base_url = f"http://127.0.0.1:{port}/v1"
        text = wait_for_line(proc, log, f"serving tiny at {base_url} (Ctrl-C to stop", timeout=600)
        config_file = tmp_path / "run" / "serve" / "serve_config.yaml"
        assert f"Serve config written to {config_file}" in text

        client = openai.OpenAI(base_url=base_url, api_key="EMPTY", max_retries=0, timeout=120)
        answer = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                max_tokens=4, temperature=0.0, extra_body={"min_tokens": 4})
        assert answer.model == "tiny" and answer.usage.completion_tokens == 4

        # Everything this command started: its Ray (GCS, raylet, workers), the engine, HAProxy.
        tree = psutil.Process(proc.pid).children(recursive=True)
        assert "haproxy" in {p.name() for p in tree}
        assert any(p.name() == "raylet" for p in tree)

        # The model worker has its CPUs to itself; every other thread of the command runs elsewhere.
        split = engine_core_split()
        if split is None:  # a one-CPU machine: nothing to keep apart
            assert "model workers on CPUs" not in text
        else:
            engine, rest = split
            assert f"vLLM's model workers on CPUs {engine}, Ray's processes on {rest}" in text
            workers = [p for p in tree if p.name() == "VLLM::Worker"]
            assert len(workers) == 1
            assert thread_cpus(workers) == {frozenset(engine)}
            others = [psutil.Process(proc.pid)] + [p for p in tree if p not in workers]
            assert thread_cpus(others) == {frozenset(rest)}

        proc.send_signal(signal.SIGTERM)  # what `kill` sends; Ctrl-C takes the same path
        stopped = time.time()
        assert proc.wait(180) == 0, log.read_text()[-3000:]
        seconds = time.time() - stopped
        text = log.read_text()
        # Its own Ray goes with everything in it, without Serve's half-minute drain.
        assert "stopping: 'rayalign' stops with the Ray this command started" in text
        assert "rayalign serve: stopped serving tiny" in text and "Traceback" not in text
        gone, alive = psutil.wait_procs(tree, timeout=60)
        assert not alive, [f"{p.pid} {p.name()}" for p in alive]
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"{base_url}/models", timeout=5)
        assert seconds < 25, f"stopping took {seconds:.0f} s"
    finally:
        kill_command(proc, tree)
