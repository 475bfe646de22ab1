"""The console is for people: library logs stay off it unless asked for, and training's progress
lines reach the driver through the file rank 0 appends to."""

import logging
import os
import subprocess
import threading
import time

from rayalign.cluster import _link_logs
from rayalign.console import quiet_ray_console, verbose
from rayalign.train.logs import CONSOLE, follow, say, show_step
from tests.conftest import PYTHON, ROOT

LIBRARIES = """
import logging
from rayalign.console import quiet_libraries
quiet_libraries()
from vllm.logger import init_logger
from ray.llm._internal.common.observability.logging import get_logger
init_logger("vllm.rayalign_test").warning("vllm-warning")
init_logger("vllm.rayalign_test").error("vllm-error")
get_logger("rayalign_test").info("ray-llm-info")
logging.getLogger("DeepSpeed").addHandler(logging.StreamHandler())
logging.getLogger("DeepSpeed").warning("deepspeed-warning")
# A process started from here times a progress bar as vLLM's LLM.generate does (a disabled bar
# has no elapsed time: vLLM divided by zero when quiet_libraries disabled tqdm for children).
import subprocess, sys
child = ("import time; from tqdm import tqdm; bar = tqdm(total=1); time.sleep(0.01); bar.update(1); "
         "print('tqdm-rate', 1 / bar.format_dict['elapsed'])")
print(subprocess.run([sys.executable, "-c", child], capture_output=True, text=True).stdout)
"""


def run_libraries(**env):
    environ = {k: v for k, v in os.environ.items() if k not in ("RAYALIGN_VERBOSE", "VLLM_LOGGING_LEVEL")}
    done = subprocess.run([PYTHON, "-c", LIBRARIES], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**environ, **env})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def test_library_logs_stay_off_the_console_unless_verbose():
    quiet = run_libraries()
    assert "vllm-error" in quiet and "tqdm-rate" in quiet
    for line in ("vllm-warning", "ray-llm-info", "deepspeed-warning"):
        assert line not in quiet
    loud = run_libraries(RAYALIGN_VERBOSE="1")
    for line in ("vllm-warning", "vllm-error", "ray-llm-info", "deepspeed-warning"):
        assert line in loud


def test_verbose_inside_a_ray_job(monkeypatch):
    monkeypatch.delenv("RAYALIGN_VERBOSE", raising=False)
    monkeypatch.delenv("RAY_JOB_ID", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    assert not verbose()
    monkeypatch.setenv("RAY_JOB_ID", "02000000")
    assert verbose()


def test_ray_console_handlers_keep_errors_and_ray_datas_file_keeps_all(monkeypatch):
    """ray.init sets the `ray` logger's level again each time it is called, so the handlers are
    what is quieted; Ray Data's own log file handler keeps its level."""
    import ray.data  # noqa: F401  (adds Ray Data's handlers)

    monkeypatch.delenv("RAYALIGN_VERBOSE", raising=False)
    data = logging.getLogger("ray.data")
    levels = {handler: handler.level for name in ("ray", "ray.data") for handler in logging.getLogger(name).handlers}
    try:
        quiet_ray_console()
        consoles = [h for h in data.handlers if isinstance(h, logging.StreamHandler)]
        files = [h for h in data.handlers if not isinstance(h, logging.StreamHandler)]
        assert consoles and files
        assert all(h.level == logging.ERROR for h in consoles)
        assert all(h.level < logging.INFO for h in files)
        assert all(h.level == logging.ERROR for h in logging.getLogger("ray").handlers
                   if isinstance(h, logging.StreamHandler))
    finally:
        for handler, level in levels.items():
            handler.setLevel(level)


def test_about_ten_training_steps_reach_the_console():
    assert [s for s in range(1, 45) if show_step(s, 44)] == [1, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44]
    assert [s for s in range(1, 4) if show_step(s, 3)] == [1, 2, 3]


def test_follow_echoes_the_lines_rank_0_appends(tmp_path):
    say(tmp_path, "from an earlier run")
    shown = []

    def rank_0():
        for step in range(1, 4):
            say(tmp_path, f"step {step}/3")
            time.sleep(0.05)
        with open(tmp_path / CONSOLE, "a") as f:
            f.write("rayalign train: half a li")  # completed after the block: not shown half
            f.flush()
            time.sleep(0.1)
            f.write("ne\n")

    with follow(tmp_path, echo=shown.append, every=0.02):
        writer = threading.Thread(target=rank_0)
        writer.start()
        writer.join()
    assert shown == ["rayalign train: step 1/3", "rayalign train: step 2/3", "rayalign train: step 3/3",
                     "rayalign train: half a line"]


def test_the_run_directory_links_to_the_newest_ray_log_folder(tmp_path):
    first, second = tmp_path / "session_1", tmp_path / "session_2"
    first.mkdir()
    second.mkdir()
    (second / "raylet.out").write_text("from the second session")
    run = tmp_path / "run"
    assert _link_logs(run, str(first)) == run / "logs"
    assert _link_logs(run, str(second)) == run / "logs"
    assert (run / "logs" / "raylet.out").read_text() == "from the second session"
    mine = tmp_path / "mine"
    (mine / "logs").mkdir(parents=True)
    (mine / "logs" / "notes.txt").write_text("a user's own folder")
    assert _link_logs(mine, str(second)) is None  # left alone
    assert (mine / "logs" / "notes.txt").read_text() == "a user's own folder"


NATIVE = """
import sys
import ray.data
from rayalign.cluster import connect, stop_ray
from rayalign.config import ClusterConfig
from rayalign.console import as_command

class Same:
    def __call__(self, batch):
        return batch

as_command(True)
connect(ClusterConfig(num_cpus=2), sys.argv[1])
rows = ray.data.range(4).map_batches(Same, compute=ray.data.ActorPoolStrategy(size=1)).take_all()
print("rows", len(rows))
print("a command's own message", file=sys.stderr)
stop_ray()
"""


def test_a_commands_native_stderr_goes_to_the_log_folder(tmp_path):
    """Ray's C++ core worker writes an error line to descriptor 2 for every actor a Ray Data
    stage starts; in a command it lands in the log folder, and Python's stderr stays."""
    environ = {k: v for k, v in os.environ.items() if k not in ("RAYALIGN_VERBOSE", "RAY_ADDRESS")}
    done = subprocess.run([PYTHON, "-c", NATIVE, str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=environ)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rows 4" in done.stdout
    assert done.stderr.strip() == "a command's own message", done.stderr
    kept = (tmp_path / "run" / "logs" / "rayalign-driver-stderr.log").read_text()
    assert "core_worker.cc" in kept and "has constructor arguments in the object store" in kept
