"""Diagnosis: where `rayalign serve` loses throughput under load, as seen by streaming clients.

Same servers, model, prompts and concurrency as bench/serve_latency.py, but every request
streams, and the arrival time of every chunk is kept. Merged over all clients, those arrival
times show stalls: stretches longer than --stall-ms in which no client received anything and no
request was sent (so not the prefill of a new batch). vLLM's server streams in a regular rhythm
(one prefill pause per batch); the numbers here say how often and how long the other server
goes quiet while requests are in flight, and how late first tokens come (TTFT p90/p99).

Usage: python bench/serve_stalls.py [--preset bench-large] [--rounds 1] [--requests 128]
       [--concurrency 8] [--max-tokens 32] [--stall-ms 350]
Writes bench/results/serve_stalls.json (rounds alternate: vLLM, then rayalign).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serve_latency import ENGINE, SERVER_NICENESS, bench_rayalign, bench_vllm, off_engine_cores, run_delay  # noqa: E402


async def stream_load(base_url: str, prompts: list[str], concurrency: int,
                      max_tokens: int) -> tuple[list[dict], float]:
    """One streamed chat completion per prompt, `concurrency` at a time; per request the
    send time and each chunk's arrival time, in seconds from the start of the run; and the
    seconds this process waited for a core meanwhile."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key="EMPTY", max_retries=0, timeout=120)
    gate = asyncio.Semaphore(concurrency)
    requests: list[dict] = []
    origin = 0.0

    async def one(text: str) -> None:
        async with gate:
            sent = time.perf_counter() - origin
            chunks = []
            stream = await client.chat.completions.create(
                model="bench", messages=[{"role": "user", "content": text}], max_tokens=max_tokens,
                temperature=0.0, extra_body={"min_tokens": max_tokens}, stream=True)
            async for _ in stream:
                chunks.append(time.perf_counter() - origin)
            requests.append({"sent": sent, "chunks": chunks})

    origin = time.perf_counter()
    await asyncio.gather(*(one(p) for p in prompts[:concurrency * 2]))  # warm-up
    requests.clear()
    origin, waited = time.perf_counter(), run_delay()
    await asyncio.gather(*(one(p) for p in prompts))
    await client.close()
    return requests, run_delay() - waited


def quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def stalls(requests: list[dict], stall_s: float) -> list[tuple[float, float]]:
    """(start, length) of each gap longer than `stall_s` between consecutive chunk arrivals
    (any client) in which no request was sent."""
    arrivals = sorted(t for r in requests for t in r["chunks"])
    sends = [r["sent"] for r in requests]
    return [(a, b - a) for a, b in zip(arrivals, arrivals[1:])
            if b - a > stall_s and not any(a <= s <= b for s in sends)]


def summarise(requests: list[dict], stall_s: float) -> dict:
    done = [r for r in requests if r["chunks"]]
    seconds = max(t for r in done for t in r["chunks"])
    ttft = [r["chunks"][0] - r["sent"] for r in done]
    found = stalls(done, stall_s)
    return {"requests": len(requests), "seconds": round(seconds, 2),
            "requests_per_s": round(len(requests) / seconds, 2),
            "ttft_p50_ms": round(1000 * statistics.median(ttft), 1),
            "ttft_p90_ms": round(1000 * quantile(ttft, 0.9), 1),
            "ttft_p99_ms": round(1000 * quantile(ttft, 0.99), 1),
            "stalls": len(found), "stalled_s": round(sum(length for _, length in found), 2),
            "stalled_share": round(sum(length for _, length in found) / seconds, 3),
            "longest_stall_ms": round(1000 * max((length for _, length in found), default=0.0), 1),
            "stall_list": [[round(a, 2), round(length, 3)] for a, length in found]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="bench-large")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--stall-ms", type=float, default=350.0)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpx2").setLevel(logging.WARNING)

    from rayalign.models import PRESETS, builtin_corpus, init_model

    if args.preset not in PRESETS:
        parser.error(f"--preset {args.preset}: choose from {', '.join(PRESETS)}")
    model_dir = Path(args.out) / "models" / args.preset
    if not (model_dir / "config.json").exists():
        init_model(model_dir, args.preset)
    prompts = [f"Continue: {line}" for line in builtin_corpus(seed=7, sentences=args.requests)]

    def measure(base_url: str, prompts: list[str], args, server_pid: int) -> dict:
        with off_engine_cores(server_pid):
            requests, waited = asyncio.run(stream_load(base_url, prompts, args.concurrency, args.max_tokens))
        return {**summarise(requests, args.stall_ms / 1000), "load_generator_run_delay_s": round(waited, 2)}

    rounds = {"vllm_serve": [], "rayalign_serve": []}
    model = str(model_dir.resolve())
    for _ in range(args.rounds):
        rounds["vllm_serve"].append(bench_vllm(model, prompts, args, measure=measure))
        rounds["rayalign_serve"].append(bench_rayalign(model, prompts, args, measure=measure))
    results = {"preset": args.preset, "engine": ENGINE, "concurrency": args.concurrency,
               "max_tokens": args.max_tokens, "stall_ms": args.stall_ms, "server_niceness": SERVER_NICENESS,
               "cpu_count": os.cpu_count(), "rounds": rounds,
               "command": "python " + " ".join(sys.argv),
               "finished": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_stalls.json").write_text(json.dumps(results, indent=2))
    for server, runs in rounds.items():
        for run in runs:
            print(server, {k: v for k, v in run.items() if k != "stall_list"})


if __name__ == "__main__":
    main()
