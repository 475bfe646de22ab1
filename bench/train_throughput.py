"""Benchmark: `rayalign train` (one Ray Train worker, DeepSpeed) against TRL's DPOTrainer with
`loss_type="apo_zero"` and `precompute_ref_log_probs=True`, on the same pairs, batch, sequence
lengths and precision, in fp32 and bf16, in one run.

Reported per system and precision: steady-state pairs/s (median over steps after warm-up),
start-up time to the first step, the reference pass separately, peak memory, and the share of
this machine's measured matmul peak that training achieves (6 x parameters x tokens per pair).

TRL is installed into bench/.deps only (not into the project's environment):
    python -m pip install --target bench/.deps --no-deps trl==1.16.0 accelerate
Usage: python bench/train_throughput.py [--pairs 256] [--steps 12] [--out bench/results]
Writes bench/results/train_throughput.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
DEPS = ROOT / "bench" / ".deps"
BATCH, MICRO = 32, 8


def make_pairs(path: Path, n: int, seed: int = 0) -> None:
    """Text pairs with ~40-token prompts and ~90-token completions that differ minimally."""
    from rayalign import records
    from rayalign.models import builtin_corpus

    lines = builtin_corpus(seed=seed, sentences=4 * n)
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = " ".join(lines[4 * i:4 * i + 2])
        chosen = " ".join(lines[4 * i + 2:4 * i + 4] * 2)
        words = chosen.split()
        k = rng.randrange(len(words))
        words[k] = "mistaken" if words[k] == "wrong" else "wrong"
        rows.append({"id": f"p{i}", "prompt": prompt, "chosen": chosen, "rejected": " ".join(words)})
    records.write_rows(rows, path, "jsonl")


def matmul_peak(dtype_name: str) -> float:
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    a, b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
    for _ in range(3):
        a @ b
    start, reps = time.perf_counter(), 10
    for _ in range(reps):
        a @ b
    return 2 * 2048**3 * reps / (time.perf_counter() - start)


def steady(values: list[float], skip: int = 3) -> float:
    return statistics.median(values[skip:] if len(values) > skip + 2 else values)


def bench_rayalign(model: str, pairs: Path, out: Path, precision: str, steps: int, n_pairs: int, batch: int = BATCH,
                   micro: int = MICRO, max_length: int = 256, max_prompt_length: int = 64, extra: tuple = ()) -> dict:
    from rayalign.config import load_config
    from rayalign.train.run import run_train

    epochs = max(1, -(-steps * batch // n_pairs))
    config = load_config(None, [
        f"run_dir={out}", f"train.model={model}", f"train.pairs={pairs}", f"train.output={out / 'train'}",
        "train.num_workers=1", f"train.cpus_per_worker={os.cpu_count()}", "train.zero_stage=0", f"train.precision={precision}", f"train.batch_size={batch}",
        f"train.micro_batch_size={micro}", f"train.max_length={max_length}", f"train.max_prompt_length={max_prompt_length}",
        f"train.epochs={epochs}", "train.learning_rate=1e-6", "train.checkpoint_every=100000",
        f"reference.output={out / 'reference'}", f"reference.cpus_per_actor={os.cpu_count()}", "cluster.num_cpus=4",
        *extra,
    ])
    peak = [0]
    running = [True]

    def sample():  # resident memory of the Ray Train worker (the process that trains)
        while running[0]:
            total = 0
            for proc in psutil.process_iter(["cmdline"]):
                if "RayTrainWorker" in " ".join(proc.info["cmdline"] or []):
                    try:
                        total += proc.memory_info().rss
                    except psutil.Error:
                        continue
            peak[0] = max(peak[0], total)
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    summary = run_train(config)
    wall = time.perf_counter() - started
    running[0] = False
    sampler.join()
    metrics = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    manifest = json.loads((Path(summary["pairs_file"]).parent / "manifest.json").read_text())
    first_step_end = metrics[0]["elapsed_s"]
    train_seconds = metrics[-1]["elapsed_s"]
    skip = 1 if len(metrics) < 6 else 3
    return {"steps": len(metrics), "pairs_per_s": round(steady([m["pairs/s"] for m in metrics], skip), 4),
            "tokens_per_s": round(steady([m["tokens/s"] for m in metrics], skip), 1),
            "padding_fraction": round(statistics.fmean(m.get("padding_fraction", 0.0) for m in metrics), 3),
            "mfu": round(steady([m.get("mfu", 0.0) for m in metrics], skip), 3),
            "reference_pass_s": manifest.get("seconds"),
            "startup_s": round(wall - train_seconds - (manifest.get("seconds") or 0) + first_step_end, 1),
            "peak_rss_gb": round(peak[0] / 1024**3, 2), "wall_s": round(wall, 1)}


def bench_trl(model: str, pairs: Path, out: Path, precision: str, steps: int, batch: int = BATCH,
              micro: int = MICRO, max_length: int = 256) -> dict:
    """TRL runs in a subprocess with bench/.deps on its path, so the project's env stays clean."""
    env = {**os.environ, "PYTHONPATH": f"{DEPS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "HF_DATASETS_CACHE": str(out / "datasets-cache")}  # TRL caches its reference pass there
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("trl_dpo.py")), model, str(pairs),
                           str(out), precision, str(steps), str(batch), str(micro), str(max_length)],
                          capture_output=True, text=True, env=env, timeout=3600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"TRL benchmark failed:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()

    from transformers import AutoConfig

    from rayalign.models import init_model

    out = Path(args.out).resolve()
    model = out / "models" / "bench"
    if not (model / "config.json").exists():
        init_model(model, "bench")
    pairs = out / "train_pairs"
    if not pairs.exists():
        make_pairs(pairs, args.pairs)
    params = json.loads((model / "rayalign_model.json").read_text())["parameters"]
    results = {"model": f"bench preset ({params / 1e6:.1f}M parameters)", "batch": BATCH, "micro_batch": MICRO,
               "pairs": args.pairs, "cpu_count": os.cpu_count(),
               "hidden": AutoConfig.from_pretrained(model).hidden_size}
    for precision in ("fp32", "bf16"):
        # Fresh each run: a finished training is not retrained, and both reference passes (ours and
        # TRL's datasets cache) would be reused, so their times would be stale.
        for system in ("rayalign", "trl"):
            shutil.rmtree(out / f"{system}-{precision}", ignore_errors=True)
        peak = matmul_peak(precision)
        ours = bench_rayalign(str(model), pairs, out / f"rayalign-{precision}", precision, args.steps, args.pairs)
        theirs = bench_trl(str(model), pairs, out / f"trl-{precision}", precision, args.steps)
        for result in (ours, theirs):
            result["matmul_peak_share"] = round(6 * params * result["tokens_per_s"] / peak, 3)
        results[precision] = {"matmul_peak_gflops": round(peak / 1e9, 1), "rayalign": ours, "trl": theirs,
                              "ratio_pairs_per_s": round(ours["pairs_per_s"] / theirs["pairs_per_s"], 2)}
    best_ours = max(results[p]["rayalign"]["pairs_per_s"] for p in ("fp32", "bf16"))
    best_trl = max(results[p]["trl"]["pairs_per_s"] for p in ("fp32", "bf16"))
    results["ratio_best_precision"] = round(best_ours / best_trl, 2)
    results["command"] = "python " + " ".join(sys.argv)
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_throughput.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
