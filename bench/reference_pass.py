"""Benchmark: the reference pass on the real model (SmolLM2-135M-Instruct) both ways, on the
varied-length pairs of the packing benchmark: the transformers forward on a Ray Data actor
(padded, and packed as under `train.packing`) against `reference.backend: vllm` (vLLM's prompt
log-probs through ray.data.llm, plus its first-batch check against the transformers forward), in
one run. Each is timed from the config to the cached Parquet file (`rayalign reference`), start-up
included; for vLLM the scoring and the check are also timed apart, and the check's agreement is
recorded. fp32, this machine's best precision (bf16 runs about 8x slower without AVX512-BF16).

Usage: python bench/reference_pass.py [--pairs 128] [--out bench/results]
Writes bench/results/reference_pass.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_packing import MAX_LENGTH, MAX_PROMPT, cpu_model, make_varied_pairs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=128)
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()

    import pyarrow.parquet as pq

    from rayalign.config import load_config
    from rayalign.pretrained import pretrained_model
    from rayalign.train.run import run_reference

    out = Path(args.out).resolve()
    model = str(pretrained_model("smollm2-135m-instruct"))
    pairs = out / "reference_pairs"
    shutil.rmtree(pairs, ignore_errors=True)
    make_varied_pairs(pairs, args.pairs)
    cpus = os.cpu_count()
    results = {"model": "SmolLM2-135M-Instruct", "precision": "fp32", "pairs": args.pairs, "max_length": MAX_LENGTH,
               **cpu_model()}
    systems = {
        "transformers-padded": (),
        "transformers-packed": ("train.packing=true",),
        "vllm": ("reference.backend=vllm", "reference.engine.max_model_len=512",
                 "reference.engine.gpu_memory_utilization=0.3", "reference.engine.batch_size=32",
                 f"reference.engine.cpus_per_engine={cpus}", "reference.engine.engine_args={enforce_eager: true}"),
    }
    values = {}
    for name, extra in systems.items():
        run_dir = out / f"reference-{name}"
        shutil.rmtree(run_dir, ignore_errors=True)
        config = load_config(None, [
            f"run_dir={run_dir}", f"train.model={model}", f"train.pairs={pairs}", "train.precision=fp32",
            f"train.max_length={MAX_LENGTH}", f"train.max_prompt_length={MAX_PROMPT}", "train.micro_batch_size=4",
            "train.batch_size=16", "train.num_workers=1", "reference.batch_size=16",
            f"reference.cpus_per_actor={cpus}", "cluster.num_cpus=4", *extra])
        print(f"bench: reference pass, {name} ...", flush=True)
        started = time.perf_counter()
        path = run_reference(config)
        seconds = time.perf_counter() - started
        manifest = json.loads((path.parent / "manifest.json").read_text())
        table = pq.read_table(path)
        values[name] = [table.column(k).to_pylist() for k in ("ref_chosen_logps", "ref_rejected_logps")]
        tokens = sum(len(p) * 2 + len(c) + len(r) for p, c, r in zip(
            *(table.column(k).to_pylist() for k in ("prompt_ids", "chosen_ids", "rejected_ids"))))
        results[name] = {"seconds": round(seconds, 1), "pairs_per_s": round(args.pairs / seconds, 3),
                         "tokens_per_s": round(tokens / seconds, 1), **({"check": manifest["check"]}
                                                                       if "check" in manifest else {})}
        print(f"bench: {name}: {json.dumps(results[name])}", flush=True)
    base = values["transformers-padded"]
    for name in ("transformers-packed", "vllm"):
        results[name]["max_abs_difference_from_padded"] = float(max(
            abs(a - b) for side in range(2) for a, b in zip(values[name][side], base[side])))
    results["ratio_vllm_over_padded"] = round(results["transformers-padded"]["seconds"] / results["vllm"]["seconds"], 2)
    results["ratio_vllm_over_packed"] = round(results["transformers-packed"]["seconds"] / results["vllm"]["seconds"], 2)
    results["command"] = "python " + " ".join(sys.argv)
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    out.mkdir(parents=True, exist_ok=True)
    (out / "reference_pass.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
