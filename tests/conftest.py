"""Shared fixtures: one Ray instance, one tiny model, one student and one OpenAI-compatible
server per test session (vLLM engine starts cost 15-60 s each on 2 cores)."""

import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from rayalign import events
from rayalign.cluster import free_port, haproxy_env

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
SERVER_KEY = "sk-rayalign-test-0123456789"

# Keep every vLLM engine small: the KV cache lives in CPU memory here (GiB).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# Set before Ray starts, so reviser actors inherit it as they would from a user's shell.
os.environ["RAYALIGN_TEST_KEY"] = SERVER_KEY
# Every vLLM engine start and Ray Train fit of the session is recorded where it happens, in
# whatever process (rayalign.events); the counts are printed at the end of the run.
os.environ[events.ENV] = tempfile.mkdtemp(prefix="rayalign-events-")


_test_times = []  # (start, end, module) of every test run, setup and teardown included


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    start = time.time()
    yield
    _test_times.append((start, time.time(), item.module.__name__.removeprefix("tests.")))


def _module_at(when: float) -> str:
    return next((module for start, end, module in _test_times if start <= when <= end), "outside a test")


def pytest_terminal_summary(terminalreporter):
    found = events.read(os.environ[events.ENV])
    engines = Counter(Path(e["model"]).name for e in found if e["kind"] == "engine")
    fits = Counter(Path(e["output"]).parent.name for e in found if e["kind"] == "fit")
    terminalreporter.section("vLLM engine starts and Ray Train fits in this session")
    terminalreporter.write_line(f"engine starts: {sum(engines.values())} ("
                                + ", ".join(f"{model} {n}" for model, n in engines.most_common()) + ")")
    terminalreporter.write_line(f"training fits: {sum(fits.values())} ("
                                + ", ".join(f"{run} {n}" for run, n in fits.most_common()) + ")")
    by_module = Counter((_module_at(e["time"]), e["kind"]) for e in found)
    for module in sorted({module for module, _ in by_module}):
        terminalreporter.write_line(f"  {module}: {by_module[module, 'engine']} engine starts, "
                                    f"{by_module[module, 'fit']} fits")


# Session fixtures that hold a running engine. The modules that use one run one after the other,
# and the engine stops after its last user, not at the end of the session: engines left running
# for nothing once filled this 24 GiB machine while later tests trained a real model.
SHARED_ENGINES = ("openai_server", "served")
_stop_after = {}  # fixture name -> nodeid of the last test that uses it
_stoppers = {}    # fixture name -> function that stops its engine, while it runs


def pytest_collection_modifyitems(items):
    modules = {}
    for item in items:
        modules.setdefault(item.module.__name__, []).append(item)
    group = {}  # module -> position of the first module that shares an engine with it
    first_user = {}
    for position, (module, its) in enumerate(modules.items()):
        used = [name for name in SHARED_ENGINES if any(name in item.fixturenames for item in its)]
        group[module] = min([first_user.setdefault(name, position) for name in used] or [position])
    order = sorted(modules, key=lambda module: group[module])  # stable: otherwise as collected
    items[:] = [item for module in order for item in modules[module]]


def pytest_collection_finish(session):
    for item in session.items:  # after -k/-m deselection
        for name in SHARED_ENGINES:
            if name in item.fixturenames:
                _stop_after[name] = item.nodeid


def stop_when_unused(name: str, stop) -> None:
    """Register how the session fixture `name` stops its engine: after its last user's teardown."""
    _stoppers[name] = stop


def stop_now(name: str) -> None:
    """Stop `name`'s engine unless it has been stopped already (the fixture's own teardown)."""
    stop = _stoppers.pop(name, None)
    if stop is not None:
        stop()


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item, nextitem):
    for name, last in _stop_after.items():
        if last == item.nodeid:
            stop_now(name)


def kill_command(proc: subprocess.Popen, tree: list) -> None:
    """Kill what is left of a command started in its own session, and every process it started."""
    import psutil

    if proc.poll() is None:
        os.killpg(proc.pid, 9)
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from rayalign.models import init_model

    return init_model(tmp_path_factory.mktemp("models") / "tiny", "tiny")


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct checkpoint in the machine's cache (RAYALIGN_CACHE or
    ~/.cache/rayalign): the first session downloads and converts it (about a minute), later ones reuse it."""
    from rayalign.pretrained import pretrained_model

    return pretrained_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def student(tmp_path_factory):
    """A tiny word-level model taught addition for a few hundred steps: it answers in the
    task's format (four digits, eos) and is partly right."""
    from rayalign.student import train_student

    return train_student(tmp_path_factory.mktemp("models") / "student", steps=300)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session, with more logical CPUs than cores so that engines,
    Serve and Train workers can be placed together."""
    import ray

    os.environ.update(haproxy_env())  # Serve's HTTP ingress is HAProxy, as on a Ray that rayalign starts
    ray.init(num_cpus=8, object_store_memory=1024**3, include_dashboard=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def openai_server(tiny_model, tmp_path_factory):
    """vLLM's own OpenAI-compatible server on loopback, serving the tiny model (with a key)."""
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "vllm.log"
    cmd = [PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_model),
           "--served-model-name", "tiny", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", "1024", "--gpu-memory-utilization", "0.1", "--api-key", SERVER_KEY,
           "--enforce-eager", "--no-enable-chunked-prefill", "--structured-outputs-config", '{"backend": "guidance", "disable_any_whitespace": true}',
           # The model in the engine core's process, as rayalign's batch engines run it on CPU.
           "--distributed-executor-backend", "uni"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 400
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM server exited: {log.read_text()[-3000:]}")
        try:
            if urllib.request.urlopen(url + "/health", timeout=2).status == 200:
                break
        except OSError:
            time.sleep(2)
    else:
        raise RuntimeError("vLLM server did not become healthy in 400 s")
    def stop():
        os.killpg(proc.pid, 15)
        proc.wait(60)

    stop_when_unused("openai_server", stop)
    yield {"base_url": url + "/v1", "model": "tiny", "key": SERVER_KEY, "log": log}
    stop_now("openai_server")
