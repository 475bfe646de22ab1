"""What a training run leaves in `train.output` besides the model: per-step metrics
(`metrics.jsonl` and TensorBoard events), the example ids of every committed optimizer step
(`steps.jsonl`), and a PNG of the curves.

A resumed run rewrites the two JSONL files from the history stored in its checkpoint and purges
later TensorBoard events, so the files always describe the final trajectory: steps redone after
a failure appear once.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
from pathlib import Path

METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
           "logps/chosen", "logps/rejected", "grad_norm", "learning_rate", "tokens/s", "padding_fraction", "mfu")


def write_history(out_dir: Path, metrics: list[dict], steps: list[dict]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in (("metrics.jsonl", metrics), ("steps.jsonl", steps)):
        tmp = out_dir / f".{name}.tmp"
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
        tmp.replace(out_dir / name)


def throughput(metrics: list[dict]) -> dict:
    """A run's speed: the median tokens/s, pairs/s and mfu of its steps after the first (which
    warms up) and the mean padding_fraction; {} for a history without them (older runs)."""
    import statistics

    steps = [m for m in metrics[1:] or metrics if "mfu" in m]
    if not steps:
        return {}
    return {"tokens/s": statistics.median(m["tokens/s"] for m in steps),
            "pairs/s": statistics.median(m["pairs/s"] for m in steps),
            "padding_fraction": statistics.fmean(m["padding_fraction"] for m in steps),
            "mfu": statistics.median(m["mfu"] for m in steps)}


def throughput_line(speed: dict) -> str:
    return (f"{speed['pairs/s']:.2f} pairs/s, {speed['tokens/s']:,.0f} tokens/s, padding "
            f"{speed['padding_fraction']:.1%}, mfu {speed['mfu']:.1%}")


class RunLog:
    """The live log of rank 0: appends one line per step and flushes, so a user (or a test)
    can follow the run."""

    def __init__(self, out_dir: Path, metrics: list[dict], steps: list[dict]):
        from torch.utils.tensorboard import SummaryWriter

        self.out_dir = out_dir
        write_history(out_dir, metrics, steps)
        # Events of steps after the restored one belong to the abandoned attempt.
        self.writer = SummaryWriter(str(out_dir / "tensorboard"), purge_step=len(steps) + 1)

    def add(self, metrics: dict, step: dict) -> None:
        for name, row in (("metrics.jsonl", metrics), ("steps.jsonl", step)):
            with open(self.out_dir / name, "a") as f:
                f.write(json.dumps(row) + "\n")
        for key in METRICS:
            self.writer.add_scalar(key, metrics[key], metrics["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def plot_curves(metrics: list[dict], path: Path) -> None:
    """Loss, rewards, log-probs, accuracy, grad norm and learning rate against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    panels = [("loss", ["loss"]),
              ("rewards", ["rewards/chosen", "rewards/rejected", "rewards/margins"]),
              ("log-probs", ["logps/chosen", "logps/rejected"]),
              ("accuracy", ["rewards/accuracies"]),
              ("grad norm", ["grad_norm"]),
              ("learning rate", ["learning_rate"])]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), constrained_layout=True)
    for ax, (title, keys) in zip(axes.flat, panels):
        for key in keys:
            ax.plot(steps, [m[key] for m in metrics], label=key, marker="." if len(steps) < 50 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        if len(keys) > 1:
            ax.legend(fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)


CONSOLE = "console.log"


def say(out_dir: Path, text: str) -> None:
    """A progress line of rank 0: on its stdout (Ray's worker log, and the console with
    --verbose) and appended to `console.log`, which the driver follows (`follow`)."""
    line = f"rayalign train: {text}\n"
    # Not print(): Ray Train patches print to log as well, which shows every line twice.
    sys.stdout.write(line)
    sys.stdout.flush()
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / CONSOLE, "a", encoding="utf-8") as f:
        f.write(line)


def show_step(step: int, total: int) -> bool:
    """Which steps get a console line: the first, the last and about every tenth."""
    return step in (1, total) or step % max(1, total // 10) == 0


@contextlib.contextmanager
def follow(out_dir: Path, echo=print, every: float = 0.5):
    """While the block runs, echo the lines rank 0 appends to `console.log` (from its end now)."""
    path = out_dir / CONSOLE
    start = path.stat().st_size if path.exists() else 0
    stop = threading.Event()

    def read_new() -> None:
        nonlocal start
        if not path.exists():
            return
        with open(path, encoding="utf-8") as f:
            f.seek(start)
            text = f.read()
        complete = text[:text.rfind("\n") + 1]
        start += len(complete.encode("utf-8"))
        for line in complete.splitlines():
            echo(line)

    def loop() -> None:
        while not stop.wait(every):
            read_new()

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        read_new()
