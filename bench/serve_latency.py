"""Benchmark: `rayalign serve` (Ray Serve + ray.serve.llm) against vLLM's own OpenAI server.

Same model, same prompts, same concurrency and max_tokens, in one run, for each model preset given
(default: `bench-large`, about 160M parameters, where the model's compute weighs more in each
decoding step, then `bench`, about 25M, where per-step and per-request overheads weigh more):
requests/s and p50/p99 latency of chat completions through the `openai` client, after a
warm-up. Then, on the same server, one request at a time asking for one token: what the
serving path itself adds to a request, with no decoding and no batching to hide it.

Each server is a command in a process of its own (`python -m vllm.entrypoints.openai.api_server`,
`rayalign serve` with the local Ray it starts), and this process only generates the load. The two
servers take turns, each alone on the machine, for --rounds rounds; the summary is the median over
rounds, and every round is kept in the JSON (this machine is shared and noisy).

Usage: python bench/serve_latency.py [--presets bench-large,bench] [--rounds 2] [--requests 128]
       [--concurrency 8] [--max-tokens 32]
Writes bench/results/serve_latency.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from rayalign.cluster import free_port, haproxy_wanted

ENGINE = {"dtype": "bfloat16", "max_model_len": 512, "gpu_memory_utilization": 0.2}
# Ray's raylet starts every worker process, so Serve's replicas and the vLLM engine under them,
# at niceness 15 (its worker_niceness default). vLLM's server runs at the same niceness, so that
# on this 2-core machine the load generator (this process, niceness 0) competes with both
# servers alike; at niceness 0 vLLM's server loses about a third of its throughput to it.
SERVER_NICENESS = 15
# Each server runs in this process's session, in a process group of its own (killed as one).
# Not in a session of its own: Linux's autogroup scheduling shares the CPU between sessions
# before niceness counts, so the load generator stood level with a whole server and waited
# for a core while answers sat unread in its sockets: 17-23 s of 46-51 s runs beside `rayalign
# serve`, 1.1 s beside vLLM's server (2026-12-02); load_generator_run_delay_s keeps watch.
SERVER_GROUP = {"process_group": 0}


def wait_healthy(url: str, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(url, timeout=2).status == 200:
                return
        except OSError:
            time.sleep(1)
    raise RuntimeError(f"{url} not healthy after {timeout} s")


async def load(base_url: str, model: str, prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key="EMPTY", max_retries=0, timeout=120)
    gate = asyncio.Semaphore(concurrency)
    latencies = []

    async def one(text: str) -> None:
        async with gate:
            start = time.perf_counter()
            await client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}],
                                                 max_tokens=max_tokens, temperature=0.0,
                                                 extra_body={"min_tokens": max_tokens})
            latencies.append(time.perf_counter() - start)

    await asyncio.gather(*(one(p) for p in prompts[:concurrency * 2]))  # warm-up
    latencies.clear()
    start, waited = time.perf_counter(), run_delay()
    await asyncio.gather(*(one(p) for p in prompts))
    seconds, waited = time.perf_counter() - start, run_delay() - waited
    await client.close()
    latencies.sort()
    return {"requests": len(prompts), "seconds": round(seconds, 2),
            "requests_per_s": round(len(prompts) / seconds, 2),
            "load_generator_run_delay_s": round(waited, 2),
            "mean_ms": round(1000 * statistics.fmean(latencies), 1),
            "p50_ms": round(1000 * statistics.median(latencies), 1),
            "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1)}


def run_delay() -> float:
    """Seconds this process's threads have spent runnable but waiting for a core (Linux
    schedstat): how far the load generator itself was held up while measuring."""
    total = 0
    for task in Path("/proc/self/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[1])
        except (OSError, IndexError, ValueError):  # a thread that ended meanwhile
            pass
    return total / 1e9


def engine_cores(server_pid: int) -> set[int]:
    """The cores vLLM pinned the server's model worker to (VLLM_CPU_OMP_THREADS_BIND, which
    `rayalign serve` sets and vLLM's server leaves at auto: the same cores here)."""
    import psutil

    workers = [p for p in psutil.Process(server_pid).children(recursive=True) if p.name() == "VLLM::Worker"]
    return set().union(*(set(p.cpu_affinity()) for p in workers)) if workers else set()


@contextlib.contextmanager
def off_engine_cores(server_pid: int):
    """The load generator (this process, niceness 0) keeps off the cores of the server's model
    worker (niceness 15): wherever the scheduler put it there, it preempted the worker, and both
    servers' rounds swung between full and half throughput."""
    everywhere = os.sched_getaffinity(0)
    os.sched_setaffinity(0, (everywhere - engine_cores(server_pid)) or everywhere)
    try:
        yield
    finally:
        os.sched_setaffinity(0, everywhere)


def measure(base_url: str, prompts: list[str], args, server_pid: int) -> dict:
    with off_engine_cores(server_pid):
        return {"load": asyncio.run(load(base_url, "bench", prompts, args.concurrency, args.max_tokens)),
                "one_token_alone": asyncio.run(load(base_url, "bench", prompts, 1, 1)),
                "load_generator_cores": sorted(os.sched_getaffinity(0))}


def bench_vllm(model: str, prompts: list[str], args, measure=measure) -> dict:
    """vLLM's own OpenAI server in a process of its own; `measure(base_url, prompts, args, pid)`
    runs against it."""
    port = free_port()
    cmd = ["nice", "-n", str(SERVER_NICENESS), sys.executable, "-m", "vllm.entrypoints.openai.api_server",
           "--model", model, "--served-model-name", "bench", "--host", "127.0.0.1", "--port", str(port),
           "--dtype", ENGINE["dtype"], "--max-model-len", str(ENGINE["max_model_len"]),
           "--gpu-memory-utilization", str(ENGINE["gpu_memory_utilization"]),
           "--no-enable-chunked-prefill", "--max-num-batched-tokens", "2048"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **SERVER_GROUP)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health")
        return measure(f"http://127.0.0.1:{port}/v1", prompts, args, proc.pid)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(60)


def bench_rayalign(model: str, prompts: list[str], args, measure=measure) -> dict:
    """`rayalign serve` in a process of its own, as a user runs it (its own local Ray), like
    vLLM's server: the load generator here prints none of the server's logs."""
    port = free_port()
    cmd = [str(Path(sys.executable).with_name("rayalign")), "serve", "--model", f"bench={model}",
           f"run_dir={args.out}/serve-run", f"serve.port={port}", "cluster.num_cpus=6",
           f"serve.engine={json.dumps(ENGINE)}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **SERVER_GROUP)
    try:
        wait_healthy(f"http://127.0.0.1:{port}/v1/models")
        return measure(f"http://127.0.0.1:{port}/v1", prompts, args, proc.pid)
    finally:
        # `rayalign serve` removes its application and stops its Ray on SIGTERM as on Ctrl-C; SIGINT
        # would not reach it when this benchmark runs in the background of a shell (ignored there).
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(180)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # whatever of that Ray is left
            except ProcessLookupError:
                pass


def median(rounds: list[dict], part: str, key: str) -> float:
    return round(statistics.median(r[part][key] for r in rounds), 2)


def summary(rounds: list[dict]) -> dict:
    return {**{key: median(rounds, "load", key) for key in ("requests_per_s", "mean_ms", "p50_ms", "p99_ms")},
            "one_token_alone_p50_ms": median(rounds, "one_token_alone", "p50_ms")}


def compare(preset: str, prompts: list[str], args) -> dict:
    """Both servers on one model, --rounds rounds each, taking turns."""
    from rayalign.models import PRESETS, init_model

    model_dir = Path(args.out) / "models" / preset
    if not (model_dir / "config.json").exists():
        init_model(model_dir, preset)
    model = str(model_dir.resolve())
    parameters = json.loads((model_dir / "rayalign_model.json").read_text())["parameters"]
    results = {"model": f"{preset} preset ({parameters / 1e6:.0f}M parameters)",
                "preset": dataclasses.asdict(PRESETS[preset])}
    rounds = {"vllm_serve": [], "rayalign_serve": []}
    for _ in range(args.rounds):
        rounds["vllm_serve"].append(bench_vllm(model, prompts, args))
        rounds["rayalign_serve"].append(bench_rayalign(model, prompts, args))
    results["rounds"] = rounds
    results["vllm_serve"], results["rayalign_serve"] = summary(rounds["vllm_serve"]), summary(rounds["rayalign_serve"])
    ours, theirs = results["rayalign_serve"], results["vllm_serve"]
    results["ratios"] = {"throughput_vs_vllm": round(ours["requests_per_s"] / theirs["requests_per_s"], 3),
                         "mean_overhead_ms": round(ours["mean_ms"] - theirs["mean_ms"], 1),
                         "p50_overhead_ms": round(ours["p50_ms"] - theirs["p50_ms"], 1),
                         "p99_overhead_ms": round(ours["p99_ms"] - theirs["p99_ms"], 1),
                         "one_token_alone_p50_overhead_ms": round(ours["one_token_alone_p50_ms"]
                                                                  - theirs["one_token_alone_p50_ms"], 1)}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="bench-large,bench",
                        help="comma-separated model presets, each benchmarked in turn")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    # The load generator shares the machine with the server: no log line per request, wherever
    # logging is configured at INFO (httpx logs each request there).
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpx2").setLevel(logging.WARNING)

    from rayalign.models import PRESETS, builtin_corpus

    presets = [name.strip() for name in args.presets.split(",") if name.strip()]
    unknown = [name for name in presets if name not in PRESETS]
    if unknown or not presets:
        parser.error(f"--presets: {', '.join(unknown) or 'none given'}; choose from {', '.join(PRESETS)}")
    prompts = [f"Continue: {line}" for line in builtin_corpus(seed=7, sentences=args.requests)]
    results = {"engine": ENGINE, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
               "cpu_count": os.cpu_count(), "server_niceness": SERVER_NICENESS,
               # The Ray that `rayalign serve` starts puts HAProxy in front of Serve unless told not to.
               "rayalign_http_ingress": "haproxy" if haproxy_wanted() else "serve proxy actor",
               "presets": {preset: compare(preset, prompts, args) for preset in presets}}
    results["command"] = "python " + " ".join(sys.argv)
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_latency.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
