"""Engine starts and training fits, recorded where they happen.

When RAYALIGN_EVENTS names a directory, every vLLM engine core that starts in a process that
inherits the variable (Ray Data actors, Serve replicas, reviser actors, commands and scripts)
and every Ray Train fit that rayalign starts append one JSON line to DIR/events.jsonl:
{"kind": "engine" or "fit", "pid", "time", and the model and its dtype, or the training output}. The test
suite counts them; a user can point it anywhere to see what a run started.

vLLM runs `register` in each of its processes through the `vllm.general_plugins` entry point
in pyproject.toml; without the variable it does nothing.
"""

from __future__ import annotations

import json
import os
import sys
import time

ENV = "RAYALIGN_EVENTS"
FILE = "events.jsonl"


def record(kind: str, **facts) -> None:
    """Append one event (a single write of one line, so concurrent processes do not interleave)."""
    folder = os.environ.get(ENV)
    if not folder:
        return
    line = json.dumps({"kind": kind, "pid": os.getpid(), "time": round(time.time(), 3), **facts}) + "\n"
    os.makedirs(folder, exist_ok=True)
    fd = os.open(os.path.join(folder, FILE), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read(folder: str | os.PathLike) -> list[dict]:
    path = os.path.join(folder, FILE)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def register() -> None:
    """vLLM general plugin: record each engine core that starts in this process."""
    if not os.environ.get(ENV):
        return
    from vllm.v1.engine.core import EngineCore

    original = EngineCore.__init__
    if getattr(original, "rayalign_events", False):
        return

    def init(self, vllm_config, *args, **kwargs):
        _engine(vllm_config)
        original(self, vllm_config, *args, **kwargs)

    init.rayalign_events = True
    EngineCore.__init__ = init
    # vLLM loads plugins first thing inside EngineCore.__init__: when that is where this runs,
    # the start under way counts too.
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is original.__code__:
            _engine(frame.f_locals.get("vllm_config"))
            break
        frame = frame.f_back


def _engine(vllm_config) -> None:
    model_config = getattr(vllm_config, "model_config", None)
    dtype = getattr(model_config, "dtype", None)
    record("engine", model=str(getattr(model_config, "model", None)),
           dtype=str(dtype).removeprefix("torch.") if dtype is not None else None)
