"""Benchmark: the CLAIR generation stage against the raw vLLM engine and transformers `generate`.

Same model (the `bench` preset, ~25M parameters), same prompts (chat template applied), same
sampling settings, in one run:

1. rayalign: the generation stage of `rayalign clair` (ray.data.llm on Ray Data) on N and on 10N
   prompts; steady-state generated tokens/s is the extra tokens of the 10N run over the extra
   seconds (both runs pay the same engine start-up), and the peak memory of the whole process
   tree (driver, Ray, engine) in each run.
2. vLLM: `LLM.chat` on the same 10N prompts after a warm-up call.
3. transformers: batched `model.generate` on a subset.
Each system runs in its own process, one after the other.

Usage: python bench/clair_generation.py [--prompts 256] [--max-tokens 64] [--out bench/results]
Writes bench/results/clair_generation.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

DTYPE = "bfloat16"


def tree_rss() -> int:
    """Resident memory of this process and all its descendants (Ray workers, engines)."""
    me = psutil.Process()
    total = 0
    for proc in [me, *me.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            continue
    return total


class PeakSampler:
    def __init__(self, measure, every_s: float = 0.2):
        self.measure, self.every_s, self.peak, self.running = measure, every_s, 0, True
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def loop(self):
        while self.running:
            self.peak = max(self.peak, self.measure())
            time.sleep(self.every_s)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()


def make_prompts(n: int, seed: int = 0) -> list[dict]:
    from rayalign.models import builtin_corpus

    lines = builtin_corpus(seed=seed, sentences=n)
    rng = random.Random(seed)
    return [{"id": f"b{i}", "prompt": f"Continue the story: {line} {rng.choice(lines)}"} for i, line in enumerate(lines)]


def bench_rayalign(model: str, prompts: list[dict], max_tokens: int) -> dict:
    import ray

    from rayalign.clair.outcomes import make_units
    from rayalign.clair.stages import target_request
    from rayalign.config import EngineConfig, SamplingConfig
    from rayalign.llm import chat_stage

    engine = EngineConfig(dtype=DTYPE, max_model_len=512, gpu_memory_utilization=0.2, batch_size=64)
    sampling = SamplingConfig(temperature=0.7, max_tokens=max_tokens)
    generate = chat_stage(model, engine, target_request(sampling), "answer", eos_token_id=2)
    ds = generate(ray.data.from_items(make_units(prompts, 1, 0)))
    started = time.perf_counter()
    with PeakSampler(tree_rss) as sampler:
        rows = ds.select_columns(["answer_tokens"]).take_all()
    return {"prompts": len(prompts), "generated_tokens": sum(r["answer_tokens"] for r in rows),
            "wall_s": round(time.perf_counter() - started, 2), "peak_rss_gb": round(sampler.peak / 1024**3, 2)}


def bench_vllm(model: str, prompts: list[dict], max_tokens: int) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(model, dtype=DTYPE, max_model_len=512, gpu_memory_utilization=0.2, enable_chunked_prefill=False,
              max_num_batched_tokens=2048)
    conversations = [[{"role": "user", "content": p["prompt"]}] for p in prompts]
    params = SamplingParams(temperature=0.7, max_tokens=max_tokens)
    llm.chat(conversations[:16], params, use_tqdm=False)  # warm-up
    started = time.perf_counter()
    outputs = llm.chat(conversations, params, use_tqdm=False)
    seconds = time.perf_counter() - started
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"prompts": len(prompts), "generated_tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1)}


def bench_transformers(model: str, prompts: list[dict], max_tokens: int, batch: int = 32) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.padding_side = "left"
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).eval()
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p["prompt"]}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    tokens, seconds = 0, 0.0
    with torch.no_grad():
        for start in range(0, len(texts), batch):
            enc = tokenizer(texts[start:start + batch], return_tensors="pt", padding=True, add_special_tokens=False)
            t0 = time.perf_counter()
            out = hf.generate(**enc, max_new_tokens=max_tokens, do_sample=True, temperature=0.7,
                              pad_token_id=tokenizer.pad_token_id)
            seconds += time.perf_counter() - t0
            new = out[:, enc.input_ids.shape[1]:]
            tokens += int((new != tokenizer.pad_token_id).sum())
    return {"prompts": len(prompts), "generated_tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1)}


def run_part(part: str, args) -> dict:
    """Each system runs in its own process, alone on the machine, so that no engine of one
    lingers while the other is measured."""
    cmd = [sys.executable, __file__, "--part", part, "--prompts", str(args.prompts), "--max-tokens",
           str(args.max_tokens), "--hf-prompts", str(args.hf_prompts), "--out", args.out]
    print(f"bench: {part} ...", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{part} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")


def part(name: str, model: str, args) -> dict:
    prompts = make_prompts(args.prompts)
    large = make_prompts(10 * args.prompts, seed=1)
    if name == "vllm":
        return bench_vllm(model, large, args.max_tokens)
    if name == "transformers":
        return bench_transformers(model, large[:args.hf_prompts], args.max_tokens)
    import ray

    ray.init(num_cpus=8, include_dashboard=False)
    return {"N": bench_rayalign(model, prompts, args.max_tokens),
            "10N": bench_rayalign(model, large, args.max_tokens)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--hf-prompts", type=int, default=64)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--part", choices=["vllm", "rayalign", "transformers"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    from rayalign.models import init_model

    model_dir = Path(args.out) / "models" / "bench"
    if not (model_dir / "config.json").exists():
        init_model(model_dir, "bench")
    model = str(model_dir.resolve())
    if args.part:
        print("RESULT " + json.dumps(part(args.part, model, args)), flush=True)
        return

    started = time.time()
    results = {"model": "bench preset (25M parameters)", "dtype": DTYPE, "max_tokens": args.max_tokens,
               "prompts_N": args.prompts, "cpu_count": os.cpu_count()}
    results["vllm_raw"] = run_part("vllm", args)
    ours = run_part("rayalign", args)
    results["rayalign_N"], results["rayalign_10N"] = ours["N"], ours["10N"]
    # Steady state: both runs pay the same engine start-up, so the extra prompts of the 10N
    # run over the N run measure the stage's throughput with start-up cancelled out.
    extra_tokens = ours["10N"]["generated_tokens"] - ours["N"]["generated_tokens"]
    extra_seconds = ours["10N"]["wall_s"] - ours["N"]["wall_s"]
    results["rayalign_steady"] = {"extra_tokens": extra_tokens, "extra_seconds": round(extra_seconds, 2),
                                  "tokens_per_s": round(extra_tokens / extra_seconds, 1)}
    results["transformers"] = run_part("transformers", args)
    results["ratios"] = {
        "rayalign_vs_vllm": round(results["rayalign_steady"]["tokens_per_s"]
                                  / results["vllm_raw"]["tokens_per_s"], 3),
        "rayalign_vs_transformers": round(results["rayalign_steady"]["tokens_per_s"]
                                          / results["transformers"]["tokens_per_s"], 2),
        "peak_memory_10N_over_N": round(results["rayalign_10N"]["peak_rss_gb"]
                                        / results["rayalign_N"]["peak_rss_gb"], 3),
    }
    results["command"] = "python " + " ".join(sys.argv)
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    results["wall_s"] = round(time.time() - started, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "clair_generation.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
