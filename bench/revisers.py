"""The three CLAIR revisers on the real model: what each does to SmolLM2-135M-Instruct's answers.

On the same question prompts (rayalign.questions) and the same target samples (seeded per
unit), `rayalign clair` runs three times with SmolLM2-135M-Instruct as the target:

1. the verifier (reference answers, no model);
2. an LLM reviser on vLLM through Ray Data: SmolLM2 itself, asked for JSON (structured output);
3. the `openai` backend pointed at `rayalign serve` of the same model (the API path end to end).

For each: pairs and rejects by reason, contrast statistics, time, and what the revisions did to
correctness (judged by the verifier against the reference): chosen right, rejected right, and
pairs whose revision fixed a wrong answer or broke a right one.

Usage: python bench/revisers.py [--prompts 48] [--out bench/results]
Writes bench/results/revisers.json; bench/tables.py prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ENGINE = {"dtype": "auto", "max_model_len": 1024, "gpu_memory_utilization": 0.3, "batch_size": 32,
          "engine_args": {"enforce_eager": True}}
REVISER = {"structured_output": True, "structured_max_chars": 240, "max_tokens": 320, "temperature": 0.7}
PORT = 8123
RAYALIGN = str(Path(sys.executable).with_name("rayalign"))


def clair(run: Path, name: str, model: str, reviser: dict) -> dict:
    """`rayalign clair` as a command with one reviser; returns its summary and wall time."""
    import yaml

    config = {"run_dir": str(run), "cluster": {"num_cpus": 8, "object_store_memory_gb": 1.0},
              "clair": {"prompts": str(run / "prompts"), "target_model": model, "mode": "clair",
                        "output": str(run / name), "engine": ENGINE, "reviser": reviser,
                        "sampling": {"temperature": 0.7, "max_tokens": 96, "n": 1, "seed": 0}}}
    (run / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    print(f"bench: clair with the {name} reviser ...", flush=True)
    started = time.perf_counter()
    with open(run / f"{name}.log", "w") as log:
        subprocess.run([RAYALIGN, "clair", "--config", str(run / f"{name}.yaml")], stdout=log,
                       stderr=subprocess.STDOUT, check=True, env={**os.environ, "EMPTY_KEY": "EMPTY"})
    seconds = time.perf_counter() - started
    summary = json.loads((run / name / "manifest.json").read_text())
    return {"seconds": round(seconds, 1), "pairs": summary["pairs"], "rejects": summary["rejects_by_reason"],
            "jaccard_mean": summary["contrast"]["jaccard"]["mean"],
            "levenshtein_mean": summary["contrast"]["levenshtein"]["mean"], **correctness(run, name)}


def correctness(run: Path, name: str) -> dict:
    from rayalign import records
    from rayalign.clair.verifier import is_correct

    prompts = {r["id"]: r for r in records.load_prompts(run / "prompts")}
    pairs = records.load_pairs(run / name / "pairs") if (run / name / "pairs").exists() else []
    counts = {"chosen_right": 0, "rejected_right": 0, "fixed": 0, "broke": 0}
    for pair in pairs:
        row = prompts[pair["id"]]
        question = records.question_text(row)
        chosen, rejected = (is_correct(pair[side][-1]["content"], row["reference"], question=question)
                            for side in ("chosen", "rejected"))
        counts["chosen_right"] += chosen
        counts["rejected_right"] += rejected
        counts["fixed"] += chosen and not rejected
        counts["broke"] += rejected and not chosen
    return counts


def serve(run: Path, model: str):
    """`rayalign serve` of the model as a command; returns the process once it answers."""
    with open(run / "serve.log", "w") as log:
        proc = subprocess.Popen([RAYALIGN, "serve", "--model", f"smollm2={model}", f"run_dir={run / 'serve'}",
                                 f"serve.port={PORT}", "cluster.num_cpus=6", f"serve.engine={json.dumps(ENGINE)}"],
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 900
    while "serving smollm2 at" not in (run / "serve.log").read_text():
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"rayalign serve did not start:\n{(run / 'serve.log').read_text()[-3000:]}")
        time.sleep(3)
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=48)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()

    from rayalign import records
    from rayalign.pretrained import pretrained_model
    from rayalign.questions import question_prompts

    model = str(pretrained_model("smollm2-135m-instruct"))
    run = Path(args.out).resolve() / "revisers-run"
    if run.exists():
        import shutil

        shutil.rmtree(run)
    records.write_rows(question_prompts(args.prompts, "train", seed=7), run / "prompts", "jsonl")
    started = time.time()
    results = {"model": "SmolLM2-135M-Instruct (Q4_1 dequantized to float32)", "prompts": args.prompts,
               "reviser_settings": REVISER}
    results["verifier"] = clair(run, "verifier", model, {"backend": "verifier"})
    results["vllm"] = clair(run, "vllm", model, {**REVISER, "backend": "vllm", "model": model, "engine": ENGINE})
    server = serve(run, model)
    try:
        results["openai"] = clair(run, "openai", model, {
            **REVISER, "backend": "openai", "base_url": f"http://127.0.0.1:{PORT}/v1", "model": "smollm2",
            "api_key_env": "EMPTY_KEY", "max_concurrency": 16})
    finally:
        server.send_signal(signal.SIGTERM)  # the command stops its own Ray and Serve
        try:
            server.wait(300)
        finally:
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGKILL)
    from bench.clair_generation import cpu_info

    results.update(cpu=cpu_info(), command="python " + " ".join(sys.argv),
                   finished=time.strftime("%Y-%m-%d %H:%M:%S", time.localtime()),
                   wall_s=round(time.time() - started, 1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "revisers.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
