"""Benchmark: the CLAIR generation stage against the raw vLLM engine and transformers `generate`.

Same model, same prompts (chat template applied), same sampling settings and dtype, in one run.
The model is the `bench` preset (~25M random parameters, prompts of made-up English) or, with
`--model smollm2-135m-instruct`, the real pretrained SmolLM2-135M-Instruct on the question
prompts of `rayalign questions` (answers of varied length, in sentences). The dtype is what
`engine.dtype: auto` picks on this CPU (`--dtype` to choose), recorded with the CPU's model and
flags:

1. rayalign: the generation stage of `rayalign clair` (ray.data.llm on Ray Data) on N and on 10N
   prompts; steady-state generated tokens/s is the extra tokens of the 10N run over the extra
   seconds (both runs pay the same engine start-up), and the peak memory of the whole process
   tree (driver, Ray, engine) in each run.
2. vLLM: `LLM.chat` on the same 10N prompts after a warm-up call.
3. transformers: batched `model.generate` on a subset.
Each system runs in its own process, one after the other.

Usage: python bench/clair_generation.py [--model bench|smollm2-135m-instruct] [--prompts 256]
       [--max-tokens 64] [--dtype auto|float32|bfloat16] [--out bench/results]
Writes bench/results/clair_generation.json (bench) or clair_generation_smollm2-135m-instruct.json.
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

MODELS = ("bench", "smollm2-135m-instruct")


def cpu_info() -> dict:
    """The CPU's model name and the flags that decide bf16 speed (figures differ between machines)."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = set(fields.get("flags\t\t", fields.get("flags", "")).split())
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    return {"model": fields.get("model name\t", "").strip() or None, "cpus": os.cpu_count(),
            "flags": sorted(f for f in wanted if f in flags)}


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


def make_prompts(n: int, seed: int = 0, model: str = "bench") -> list[dict]:
    if model != "bench":
        from rayalign.questions import question_prompts

        # Distinct prompts from both splits: a benchmark needs no held-out set.
        half = question_prompts(n // 2, "train", seed=seed) + question_prompts(n - n // 2, "eval", seed=seed)
        return half
    from rayalign.models import builtin_corpus

    lines = builtin_corpus(seed=seed, sentences=n)
    rng = random.Random(seed)
    return [{"id": f"b{i}", "prompt": f"Continue the story: {line} {rng.choice(lines)}"} for i, line in enumerate(lines)]


def bench_rayalign(model: str, prompts: list[dict], max_tokens: int, dtype: str) -> dict:
    import ray

    from rayalign.clair.outcomes import make_units
    from rayalign.clair.stages import target_request
    from rayalign.config import EngineConfig, SamplingConfig
    from rayalign.llm import chat_stage

    engine = EngineConfig(dtype=dtype, max_model_len=512, gpu_memory_utilization=0.3, batch_size=64)
    sampling = SamplingConfig(temperature=0.7, max_tokens=max_tokens)
    generate = chat_stage(model, engine, target_request(sampling), "answer")
    ds = generate(ray.data.from_items(make_units(prompts, 1, 0)))
    started = time.perf_counter()
    with PeakSampler(tree_rss) as sampler:
        rows = ds.select_columns(["answer_tokens"]).take_all()
    return {"prompts": len(prompts), "generated_tokens": sum(r["answer_tokens"] for r in rows),
            "wall_s": round(time.perf_counter() - started, 2), "peak_rss_gb": round(sampler.peak / 1024**3, 2)}


def bench_vllm(model: str, prompts: list[dict], max_tokens: int, dtype: str) -> dict:
    from vllm import LLM, SamplingParams

    from rayalign.records import prompt_messages

    llm = LLM(model, dtype=dtype, max_model_len=512, gpu_memory_utilization=0.3, enable_chunked_prefill=False,
              max_num_batched_tokens=2048)
    conversations = [prompt_messages(p) for p in prompts]
    params = SamplingParams(temperature=0.7, max_tokens=max_tokens)
    llm.chat(conversations[:16], params, use_tqdm=False)  # warm-up
    started = time.perf_counter()
    outputs = llm.chat(conversations, params, use_tqdm=False)
    seconds = time.perf_counter() - started
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"prompts": len(prompts), "generated_tokens": tokens, "seconds": round(seconds, 2),
            "tokens_per_s": round(tokens / seconds, 1)}


def bench_transformers(model: str, prompts: list[dict], max_tokens: int, dtype: str, batch: int = 32) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayalign.records import prompt_messages

    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.padding_side = "left"
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval()
    texts = [tokenizer.apply_chat_template(prompt_messages(p), tokenize=False, add_generation_prompt=True)
             for p in prompts]
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
           str(args.max_tokens), "--hf-prompts", str(args.hf_prompts), "--out", args.out, "--model", args.model,
           "--dtype", args.dtype]
    print(f"bench: {part} ...", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"{part} failed (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")


def part(name: str, model: str, args) -> dict:
    prompts = make_prompts(args.prompts, model=args.model)
    large = make_prompts(10 * args.prompts, seed=1, model=args.model)
    if name == "vllm":
        return bench_vllm(model, large, args.max_tokens, args.dtype)
    if name == "transformers":
        return bench_transformers(model, large[:args.hf_prompts], args.max_tokens, args.dtype)
    import ray

    ray.init(num_cpus=8, include_dashboard=False)
    return {"N": bench_rayalign(model, prompts, args.max_tokens, args.dtype),
            "10N": bench_rayalign(model, large, args.max_tokens, args.dtype)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=MODELS, default="bench")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="auto: what engine.dtype auto picks on this CPU")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--hf-prompts", type=int, default=64)
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--part", choices=["vllm", "rayalign", "transformers"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    from rayalign.config import EngineConfig
    from rayalign.llm import engine_dtype

    if args.dtype == "auto":
        args.dtype = engine_dtype(EngineConfig())
    if args.model == "bench":
        from rayalign.models import init_model

        model_dir = Path(args.out) / "models" / "bench"
        if not (model_dir / "config.json").exists():
            init_model(model_dir, "bench")
    else:
        from rayalign.pretrained import pretrained_model

        model_dir = pretrained_model(args.model)
    model = str(model_dir.resolve())
    if args.part:
        print("RESULT " + json.dumps(part(args.part, model, args)), flush=True)
        return

    started = time.time()
    described = {"bench": "bench preset (25M parameters)",
                 "smollm2-135m-instruct": "SmolLM2-135M-Instruct (Q4_1 dequantized to float32), question prompts"}
    results = {"model": described[args.model], "dtype": args.dtype, "max_tokens": args.max_tokens,
               "prompts_N": args.prompts, "cpu_count": os.cpu_count(), "cpu": cpu_info()}
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
    name = "clair_generation.json" if args.model == "bench" else f"clair_generation_{args.model}.json"
    (out / name).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
