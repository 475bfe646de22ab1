"""`rayalign demo`: the embedded default, on CPU with tiny local models and local Ray.

It runs every stage that is built so far, and says plainly which are still to come.
"""

from __future__ import annotations

import time
from pathlib import Path

from rayalign import records
from rayalign.models import init_model
from rayalign.tasks import addition_prompts, vocabulary_texts

STAGES_TO_COME = ("clair", "reference", "train", "serve", "eval")


def run_demo(run_dir: str | Path) -> int:
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    timings = {}

    start = time.perf_counter()
    model_dir = run / "model"
    if not (model_dir / "config.json").exists():
        init_model(model_dir, "tiny", tokenizer_kind="word", texts=vocabulary_texts())
    timings["model"] = time.perf_counter() - start

    start = time.perf_counter()
    prompts = run / "prompts" / "train"
    if not prompts.exists():
        records.write_rows(addition_prompts(512, seed=0), prompts, "jsonl")
    rows = records.load_prompts(prompts)
    timings["prompts"] = time.perf_counter() - start

    print(f"rayalign demo: run directory {run}")
    print(f"  model       {model_dir} (tiny Llama, word-level tokenizer)   {timings['model']:.1f}s")
    print(f"  prompts     {len(rows)} addition prompts with reference answers   {timings['prompts']:.1f}s")
    for stage in STAGES_TO_COME:
        print(f"  {stage:<11} not built yet")
    return 0
