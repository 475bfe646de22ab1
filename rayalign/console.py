"""What a command prints: its own progress and results, for people. The logs of Ray, vLLM,
DeepSpeed, transformers and HAProxy stay in Ray's log files (the command names the folder);
`rayalign --verbose ...` (or RAYALIGN_VERBOSE=1) shows them live as well. Inside a Ray Job the
workers' logs still go to the job's log, where a job's user reads them."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

VERBOSE = "RAYALIGN_VERBOSE"
# Where a command's native stderr goes (see `divert_native_stderr`), in Ray's log folder.
NATIVE_STDERR = "rayalign-driver-stderr.log"
_command = False  # set by the `rayalign` command for its run; a library caller keeps its stderr


def verbose() -> bool:
    """Library logs on the console: asked for, or inside a Ray Job (whose log is a file)."""
    return os.environ.get(VERBOSE) == "1" or "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ or "RAY_JOB_ID" in os.environ


def quiet_libraries() -> None:
    """Library chatter off in this process (and in the Ray this process starts, which inherits
    the environment), unless verbose: progress bars and INFO of transformers, vLLM's INFO and
    warnings, DeepSpeed's accelerator notice, Ray's start-up lines."""
    if verbose():
        return
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' bars follow it too
    # Not TQDM_DISABLE: the processes this one starts inherit it, and vLLM's LLM.generate divides
    # by a disabled bar's elapsed time (ZeroDivisionError).
    # DeepSpeed sets its logger's level when it creates it; a filter on the logger stays.
    logging.getLogger("DeepSpeed").addFilter(lambda record: record.levelno >= logging.ERROR)
    logging.getLogger("ray").setLevel(logging.ERROR)
    # vLLM warns about Triton at import, before it configures its own logger.
    logging.getLogger("vllm").setLevel(logging.ERROR)
    # Ray's LLM library gives each module a console handler at INFO unless its parent has one.
    llm = logging.getLogger("ray.llm")
    if not llm.handlers:
        llm.addHandler(logging.NullHandler())
    llm.setLevel(logging.ERROR)
    if "transformers" in sys.modules:  # imported already: the environment is read at import
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()


def quiet_ray_console() -> None:
    """Ray's own console handlers to errors only, unless verbose. Ray sets its loggers' levels
    again on every ray.init (Ray Data and Ray's LLM library call it too), and Ray Data and Serve
    add handlers when imported, so the handlers are what stays quiet; Ray Data's log file keeps
    everything. Call after importing ray.data or ray.serve."""
    if verbose():
        return
    for name in ("ray", "ray.data", "ray.serve"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                handler.setLevel(logging.ERROR)


def as_command(on: bool) -> None:
    """Mark this process as running a `rayalign` command (its console is the user's), or not."""
    global _command
    _command = on


def divert_native_stderr(folder: str) -> Path | None:
    """In a command, unless verbose: file descriptor 2 goes to `<folder>/NATIVE_STDERR`, while
    Python's `sys.stderr` (the command's messages, a traceback) stays on the console. Ray's C++
    core worker writes its errors straight to descriptor 2, among them one line for every actor
    a Ray Data stage starts (its constructor arguments are in the object store); they are library
    logs, kept in the log folder with the rest. Once per process; returns the file, or None."""
    global _command
    if not _command or verbose():
        return None
    try:
        if sys.stderr.fileno() != 2:
            return None
    except (AttributeError, ValueError, OSError):  # replaced by a caller (a test's capture)
        return None
    _command = False  # once
    path = Path(folder) / NATIVE_STDERR
    sys.stderr.flush()
    console = os.dup(2)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 2)
    sys.stderr = os.fdopen(console, "w", buffering=1, encoding=sys.stderr.encoding, errors="backslashreplace")
    return path
