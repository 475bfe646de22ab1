"""The full GPU check behind `scripts/gpu-check --full`: every stage of the pipeline on a tiny
model and one GPU, through the functions the commands run, one line per stage with its figure:

- clair      Ray Data + vLLM answer 64 addition prompts twice, the verifier revises (pairs/s, tokens/s)
- reference  the reference pass's actors on the GPU (pairs/s)
- train      Ray Train + DeepSpeed over NCCL: 4 steps under ZeRO-2, then 2 under ZeRO-3 (tokens/s)
- export     both trained models whole in Hugging Face format (every tensor of the base, none empty)
- serve      Ray Serve + vLLM with the ZeRO-3 model, one request with the `openai` client (latency)
- eval       8 held-out prompts through the endpoint (accuracy)

Each line also gives the peak memory in use on the GPU during the stage (all processes: engines
and workers run in their own, read by nvidia-smi). The model is the digit student
(rayalign.student), taught on the CPU first. It needs the project installed
(`RAYALIGN_EXTRA=gpu make setup`); `--cpu` runs the same stages on the CPU.
"""

from __future__ import annotations

import dataclasses
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import yaml

from rayalign.gpu_check import CheckFailed

TRAIN_PROMPTS, EVAL_PROMPTS = 64, 8
# Pairs for training: 4 steps of 8 under ZeRO-2 (2 micro-batches of 4 a step), 2 of 16 under ZeRO-3.
PAIRS = 32
FITS = {2: {"batch_size": 8, "micro_batch_size": 4}, 3: {"batch_size": 16, "micro_batch_size": 8}}


def full_config(run: Path, model: Path, cpu: bool, port: int) -> dict:
    """The run config of the full check: the same keys a user sets, with a GPU for every engine
    and Train worker unless `cpu`. A quarter of the GPU per engine lets Serve's two replicas of
    nothing else share it; on the CPU the memory fraction is of RAM."""
    engine = {"dtype": "float32", "max_model_len": 256, "batch_size": 64, "engine_args": {"enforce_eager": True},
              "gpu_memory_utilization": 0.1 if cpu else 0.2, "gpus_per_engine": 0 if cpu else 0.25}
    return {
        "run_dir": str(run),
        "seed": 0,
        # On the CPU more logical CPUs than cores, as in the tests; on a GPU machine Ray counts them.
        "cluster": {"num_cpus": 8 if cpu else None, "object_store_memory_gb": 1.0, "use_gpu": not cpu},
        "clair": {"prompts": str(run / "data" / "train"), "target_model": str(model), "output": str(run / "clair"),
                  "mode": "clair", "sampling": {"temperature": 0.7, "max_tokens": 8, "n": 2, "seed": 0},
                  "engine": engine, "reviser": {"backend": "verifier"}},
        "reference": {"batch_size": 32, "output": str(run / "reference")},
        "train": {"model": str(model), "pairs": str(run / "pairs"), "output": str(run / "train-zero2"),
                  "loss": "apo_zero", "learning_rate": 1e-5, "warmup_ratio": 0, "lr_schedule": "constant",
                  "num_workers": 1, "zero_stage": 2, "precision": "fp32", "max_length": 64,
                  "max_prompt_length": 48, "checkpoint_every": 1000, "report_every": 1, **FITS[2]},
        "serve": {"port": port, "engine": engine, "models": {}},
        "eval": {"kind": "exact", "data": str(run / "data" / "eval"), "max_tokens": 8, "concurrency": 8,
                 "base_url": f"http://127.0.0.1:{port}/v1", "output": str(run / "eval")},
    }


class PeakGpuMemory:
    """The peak memory in use on GPU 0 while the block runs, by nvidia-smi every 0.2 s; None on
    the CPU or without nvidia-smi."""

    def __init__(self, enabled: bool):
        self.enabled = enabled and shutil.which("nvidia-smi") is not None
        self.peak_mib: int | None = None
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            done = subprocess.run(["nvidia-smi", "-i", "0", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                                  capture_output=True, text=True)
            if done.returncode == 0 and done.stdout.strip().isdigit():
                self.peak_mib = max(self.peak_mib or 0, int(done.stdout.strip()))
            self._stop.wait(0.2)

    def __enter__(self):
        if self.enabled:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self._stop.set()
            self._thread.join()

    def __str__(self) -> str:
        return "" if self.peak_mib is None else f", peak GPU memory {self.peak_mib:,} MiB"


def run_full(cpu: bool, run_dir: Path, out=print) -> None:
    """The full check; raises CheckFailed naming the stage that failed its check."""
    import ray
    import torch

    from rayalign import records
    from rayalign.config import load_config
    from rayalign.student import train_student
    from rayalign.tasks import addition_prompts

    if not cpu and not torch.cuda.is_available():
        raise CheckFailed("no CUDA device: run `scripts/gpu-check --full --cpu` for the same stages on the CPU")
    started = time.perf_counter()
    run = Path(run_dir).resolve()
    shutil.rmtree(run, ignore_errors=True)
    name = "CPU" if cpu else torch.cuda.get_device_name(0)
    out(f"rayalign gpu-check (full) on {name}: ray {ray.__version__}, torch {torch.__version__}; logs and "
        f"outputs in {run}")
    train_rows = addition_prompts(TRAIN_PROMPTS, seed=1)
    eval_rows = addition_prompts(EVAL_PROMPTS, seed=2, exclude={r["id"] for r in train_rows})
    for split, rows in (("train", train_rows), ("eval", eval_rows)):
        records.write_rows(rows, run / "data" / split, "jsonl")
    t0 = time.perf_counter()
    model = train_student(run / "student", steps=300)
    out(f"  model      the digit student, taught on the CPU in {time.perf_counter() - t0:.0f} s")

    (run / "config.yaml").write_text(yaml.safe_dump(full_config(run, model, cpu, _free_port()), sort_keys=False))
    config = load_config(run / "config.yaml")
    try:
        _stages(config, run, cpu, out)
    finally:
        ray.shutdown()
    out(f"rayalign gpu-check: passed in {time.perf_counter() - started:.0f} s")


def _stages(config, run: Path, cpu: bool, out) -> None:
    from rayalign import records
    from rayalign.clair.pipeline import run_clair
    from rayalign.cluster import connect
    from rayalign.train.run import run_reference, run_train

    connect(config.cluster, config.run_dir)
    with PeakGpuMemory(not cpu) as memory:
        t0 = time.perf_counter()
        clair = run_clair(config)
        seconds = time.perf_counter() - t0
    _require(clair["pairs"] >= PAIRS, f"clair: {clair['pairs']} pairs from {TRAIN_PROMPTS} prompts, fewer than the "
                                      f"{PAIRS} training needs (rejects by reason: {clair['rejects_by_reason']})")
    out(f"  clair      {TRAIN_PROMPTS} prompts x 2 samples -> {clair['pairs']} pairs in {seconds:.0f} s "
        f"({clair['pairs'] / seconds:.1f} pairs/s, {clair['this_run']['generated_tokens_per_s']} tokens/s "
        f"generated){memory}")

    pairs = [r.value for r in records.read_records(run / "clair" / "pairs")][:PAIRS]
    records.write_rows(pairs, run / "pairs", "jsonl")
    with PeakGpuMemory(not cpu) as memory:
        t0 = time.perf_counter()
        run_reference(config)
        seconds = time.perf_counter() - t0
    out(f"  reference  {PAIRS} pairs in {seconds:.1f} s ({PAIRS / seconds:.1f} pairs/s, actors on "
        f"{'the CPU' if cpu else 'the GPU'}){memory}")

    finals = {}
    for stage, steps in ((2, 4), (3, 2)):
        train = dataclasses.replace(config.train, zero_stage=stage, output=str(run / f"train-zero{stage}"),
                                    **FITS[stage])
        with PeakGpuMemory(not cpu) as memory:
            summary = run_train(dataclasses.replace(config, train=train))
        _require(summary["steps"] == steps, f"train ZeRO-{stage}: {summary['steps']} steps, not {steps}")
        last = summary["final_metrics"]
        _require(last["loss"] == last["loss"], f"train ZeRO-{stage}: the loss is NaN")
        out(f"  train      ZeRO-{stage} over {'gloo' if cpu else 'NCCL'}: {steps} steps in {summary['seconds']:.0f} s "
            f"(with start-up), last step {last['tokens/s']:,.0f} tokens/s, {last['pairs/s']:.1f} pairs/s, "
            f"loss {last['loss']:.4f}{memory}")
        finals[stage] = Path(summary["final"])
    out(f"  export     {check_export(Path(config.train.model), finals)}")

    _serve_and_evaluate(config, finals[3], cpu, out)


def check_export(base: Path, finals: dict[int, Path]) -> str:
    """Every exported model holds every tensor of the base model, with its shape, none empty
    (a ZeRO-3 export that missed a gather leaves empty tensors)."""
    from safetensors import safe_open

    def shapes(folder: Path) -> dict[str, tuple]:
        found = {}
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(file, "pt") as f:
                found.update((k, tuple(f.get_slice(k).get_shape())) for k in f.keys())
        return found

    expected = shapes(base)
    sizes = []
    for stage, folder in finals.items():
        got = shapes(folder)
        _require(got == expected, f"export ZeRO-{stage}: {folder} differs from the base model in "
                                  f"{sorted(set(got.items()) ^ set(expected.items()))[:3]}")
        _require(all(0 not in shape for shape in got.values()), f"export ZeRO-{stage}: an empty tensor in {folder}")
        sizes.append(sum(f.stat().st_size for f in folder.iterdir()) / 2**20)
    return (f"ZeRO-2 and ZeRO-3 models whole ({len(expected)} tensors with the base model's shapes), "
            f"{sizes[0]:.1f} and {sizes[1]:.1f} MiB")


def _serve_and_evaluate(config, model: Path, cpu: bool, out) -> None:
    from openai import OpenAI

    from rayalign import records
    from rayalign.evaluate import run_eval
    from rayalign.serve import serve_models, serve_shutdown

    served = dataclasses.replace(config, serve=dataclasses.replace(config.serve, models={"aligned": str(model)}),
                                 eval=dataclasses.replace(config.eval, models=["aligned"]))
    with PeakGpuMemory(not cpu) as memory:
        t0 = time.perf_counter()
        serve_models(served, served.serve.models, detach=True)
        up = time.perf_counter() - t0
        try:
            client = OpenAI(base_url=served.eval.base_url, api_key="unused", max_retries=0)
            row = next(r.value for r in records.read_records(served.eval.data))
            question = records.question_text(row)
            t0 = time.perf_counter()
            answer = client.chat.completions.create(model="aligned", messages=records.prompt_messages(row),
                                                    max_tokens=8, temperature=0)
            latency = time.perf_counter() - t0
            text = answer.choices[0].message.content
            _require(answer.usage.completion_tokens >= 1, "serve: the served model answered no token")
            out(f"  serve      up in {up:.0f} s; one request answered in {latency * 1000:.0f} ms: "
                f"{question!r} -> {text!r}{memory}")
            t0 = time.perf_counter()
            results = run_eval(served)
        finally:
            serve_shutdown(served)
    result = results["results"]["aligned"]
    _require(result["scored"] == EVAL_PROMPTS, f"eval: {result['scored']} of {EVAL_PROMPTS} prompts scored")
    out(f"  eval       {EVAL_PROMPTS} prompts through the endpoint in {time.perf_counter() - t0:.1f} s: "
        f"{result['accuracy']:.0%} exact{memory}")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise CheckFailed(message)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
