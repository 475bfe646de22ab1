"""Benchmark: packed training (`train.packing`) on pairs of varied length, on the real model
(SmolLM2-135M-Instruct), against rayalign unpacked and TRL's DPOTrainer (`loss_type="apo_zero"`,
precomputed reference) on the same pairs, batch, max length and precision, in one run.

The pairs have answers of about 15 to 160 words (a CLAIR-like minimal revision: the rejected
answer is the chosen one with a word changed or dropped) and prompts of 1 to 3 sentences. TRL's
micro-batch is the fastest of 2, 4 and 8; rayalign unpacked uses micro-batch 4, packed the token
budget of a padded micro-batch of 4 (2 x 4 x max_length), once sharing each pair's common
beginning (`train.share_prefix`, the default) and once not. Reported per system: steady pairs/s
and tokens/s (median over steps after the first), the padding fraction of the training forwards,
and the share of the matmul peak (6 x parameters x real tokens/s over a 2048 x 2048 matmul
measured in the same run, the same rule for every system); rayalign's own logged mfu beside it.

TRL is installed into bench/.deps only (`make bench` does it):
    python -m pip install --target bench/.deps --no-deps trl==1.16.0 accelerate
Usage: python bench/train_packing.py [--pairs 64] [--steps 4] [--systems a,b,...] [--out bench/results]
(`--systems`: a subset of rayalign-packed, rayalign-packed-unshared, rayalign-unpacked, trl-micro2,
trl-micro4, trl-micro8; default all). Writes bench/results/train_packing.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_throughput import bench_rayalign, bench_trl, matmul_peak  # noqa: E402

BATCH, MICRO, MAX_LENGTH, MAX_PROMPT = 16, 4, 320, 96


def make_varied_pairs(path: Path, n: int, seed: int = 0) -> None:
    from rayalign import records
    from rayalign.models import builtin_corpus

    lines = builtin_corpus(seed=seed, sentences=40 * n)
    rng = random.Random(seed)
    words = " ".join(lines).split()
    rows, at = [], 0
    for i in range(n):
        prompt = " ".join(lines[i * 3:i * 3 + rng.randint(1, 3)])
        length = rng.randint(15, 160)
        chosen = words[at:at + length]
        at += length
        rejected = list(chosen)
        k = rng.randrange(length)
        if rng.random() < 0.5:
            rejected[k] = "mistaken" if rejected[k] == "wrong" else "wrong"
        else:
            del rejected[k]
        rows.append({"id": f"v{i}", "prompt": prompt, "chosen": " ".join(chosen), "rejected": " ".join(rejected)})
    records.write_rows(rows, path, "jsonl")


def cpu_model() -> dict:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                platform.processor())
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma")
    return {"cpu": name, "flags": [f for f in wanted if f in flags], "cores": os.cpu_count()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--systems", default=None, help="comma-separated subset of the systems (default: all)")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()

    from rayalign.pretrained import pretrained_model

    out = Path(args.out).resolve()
    model = str(pretrained_model("smollm2-135m-instruct"))
    params = json.loads((Path(model) / "config.json").read_text())
    from transformers import AutoModelForCausalLM

    parameters = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model).parameters())
    pairs = out / "packing_pairs"
    shutil.rmtree(pairs, ignore_errors=True)
    make_varied_pairs(pairs, args.pairs)
    precision = "fp32"  # this machine's best: bf16 runs about 8x slower without AVX512-BF16 or AMX
    results = {"model": f"SmolLM2-135M-Instruct ({parameters / 1e6:.1f}M parameters, {params['num_hidden_layers']} "
                        f"layers)", "precision": precision, "batch": BATCH, "max_length": MAX_LENGTH,
               "pairs": args.pairs, "steps": args.steps, **cpu_model()}
    names = ("rayalign-packed", "rayalign-packed-unshared", "rayalign-unpacked", *(f"trl-micro{m}" for m in (2, 4, 8)))
    chosen = args.systems.split(",") if args.systems else list(names)
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        parser.error(f"--systems: unknown {', '.join(unknown)} (known: {', '.join(names)})")
    for name in chosen:
        shutil.rmtree(out / f"packing-{name}", ignore_errors=True)
    peak = matmul_peak(precision)
    results["matmul_peak_gflops"] = round(peak / 1e9, 1)
    common = dict(batch=BATCH, micro=MICRO, max_length=MAX_LENGTH, max_prompt_length=MAX_PROMPT)
    systems = {
        "rayalign-packed": lambda: bench_rayalign(model, pairs, out / "packing-rayalign-packed", precision, args.steps,
                                                  args.pairs, extra=("train.packing=true",), **common),
        "rayalign-packed-unshared": lambda: bench_rayalign(
            model, pairs, out / "packing-rayalign-packed-unshared", precision, args.steps, args.pairs,
            extra=("train.packing=true", "train.share_prefix=false"), **common),
        "rayalign-unpacked": lambda: bench_rayalign(model, pairs, out / "packing-rayalign-unpacked", precision,
                                                    args.steps, args.pairs, **common),
        **{f"trl-micro{m}": (lambda m=m: bench_trl(model, pairs, out / f"packing-trl-micro{m}", precision, args.steps,
                                                    batch=BATCH, micro=m, max_length=MAX_LENGTH)) for m in (2, 4, 8)},
    }
    for name in chosen:
        run = systems[name]
        print(f"bench: {name} ...", flush=True)
        result = run()
        result["matmul_peak_share"] = round(6 * parameters * result["tokens_per_s"] / peak, 3)
        results[name] = result
        print(f"bench: {name}: {json.dumps(result)}", flush=True)
    results["systems"] = chosen
    trls = [k for k in chosen if k.startswith("trl-")]
    if trls:
        trl = max(trls, key=lambda k: results[k]["pairs_per_s"])
        results["trl_best"] = trl
        for name in (k for k in chosen if k.startswith("rayalign-")):
            results[f"ratio_{name}_over_trl"] = round(results[name]["pairs_per_s"] / results[trl]["pairs_per_s"], 2)
    for name in ("rayalign-packed-unshared", "rayalign-unpacked"):
        if "rayalign-packed" in chosen and name in chosen:
            results[f"ratio_packed_over_{name.removeprefix('rayalign-')}"] = round(
                results["rayalign-packed"]["pairs_per_s"] / results[name]["pairs_per_s"], 2)
    results["command"] = "python " + " ".join(sys.argv)
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_packing.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
