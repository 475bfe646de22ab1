"""Shared pieces of the training tests: the toy pair set and a run config for it."""

from __future__ import annotations

import random
from pathlib import Path

from rayalign.config import RunConfig, load_config
from rayalign.records import write_shard
from rayalign.tasks import addition_prompts


def near_miss(answer: str, rng: random.Random) -> str:
    digits = answer.split()
    i = rng.randrange(len(digits))
    digits[i] = str((int(digits[i]) + rng.randint(1, 9)) % 10)
    return " ".join(digits)


def toy_pairs(n: int = 32, seed: int = 0) -> list[dict]:
    """Addition prompts; chosen is the correct sum, rejected a near miss (one digit off)."""
    rng = random.Random(seed)
    return [{"id": row["id"], "prompt": row["prompt"], "chosen": row["reference"],
             "rejected": near_miss(row["reference"], rng)} for row in addition_prompts(n, seed=seed)]


def write_pairs(path: Path, n: int = 32, seed: int = 0) -> Path:
    return write_shard(toy_pairs(n, seed), path)


def train_config(run_dir: Path, model: Path, pairs: Path, *overrides: str) -> RunConfig:
    base = [f"run_dir={run_dir}", f"train.model={model}", f"train.pairs={pairs}", "train.precision=fp32",
            "train.learning_rate=1e-3", "train.warmup_ratio=0", "train.lr_schedule=constant",
            "train.batch_size=8", "train.micro_batch_size=2", "train.num_workers=2", "train.max_length=64",
            "train.max_prompt_length=32", "reference.batch_size=8"]
    return load_config(None, [*base, *overrides])
