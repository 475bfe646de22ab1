"""Where a packed training step spends its time, on the real model: `python bench/packed_step_profile.py`.

One micro-batch of the packed benchmark's pairs (bench/train_packing.py: SmolLM2-135M-Instruct,
answers of 15 to 160 words, max length 320, fp32) through the training forward and backward
(`forward.pair_logps`), packed without and with shared prefixes, under torch's profiler. The
operators' own CPU time is grouped into the matrix products (`aten::mm`, `aten::addmm`,
`aten::bmm`), attention (scaled dot-product, forward and backward) and everything else. The
matrix products are work the model needs; the rest bounds what any rework of the step could
still win: with every other operator free, a step would take the matrix products' share of its
time. Results go to bench/results/packed_step_profile.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from train_packing import MAX_LENGTH, MAX_PROMPT, cpu_model, make_varied_pairs  # noqa: E402

MATMUL = ("aten::mm", "aten::addmm", "aten::bmm")
RESULTS = Path(__file__).parent / "results"


def group(name: str) -> str:
    if name in MATMUL:
        return "matmul"
    if "scaled_dot_product" in name:
        return "attention"
    return "other"


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayalign import records
    from rayalign.pretrained import pretrained_model
    from rayalign.train.data import tokenize_pairs
    from rayalign.train.forward import PACKED_ATTENTION, pair_logps, register_packed_attention

    model_dir = pretrained_model("smollm2-135m-instruct")
    work = RESULTS / "packed-step-profile"
    work.mkdir(parents=True, exist_ok=True)
    make_varied_pairs(work / "pairs.jsonl", 8, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pairs = tokenize_pairs(tokenizer, records.load_pairs(work / "pairs.jsonl"), MAX_LENGTH, MAX_PROMPT).rows
    register_packed_attention()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=PACKED_ATTENTION)
    model.train()

    def step(share: bool) -> int:
        out = pair_logps(model, pairs, tokenizer.eos_token_id, packed=True, share_prefix=share)
        (out["chosen"].sum() - out["rejected"].sum()).backward()
        model.zero_grad(set_to_none=True)
        return out["tokens"]

    rows = []
    for share in (False, True):
        step(share)  # warm-up
        start = time.perf_counter()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            tokens = step(share)
        wall = time.perf_counter() - start
        seconds = {"matmul": 0.0, "attention": 0.0, "other": 0.0}
        for event in prof.key_averages():
            seconds[group(event.key)] += event.self_cpu_time_total / 1e6
        total = sum(seconds.values())
        row = {"share_prefix": share, "pairs": len(pairs), "tokens": tokens, "wall_s": round(wall, 2),
               **{f"{k}_share": round(v / total, 4) for k, v in seconds.items()},
               "bound_if_only_matmul": round(total / seconds["matmul"], 3)}
        rows.append(row)
        print(f"share_prefix={share}: {tokens} tokens in {wall:.1f}s; matmul {row['matmul_share']:.1%}, attention "
              f"{row['attention_share']:.1%}, other {row['other_share']:.1%}; with only the matrix products a step "
              f"would be {row['bound_if_only_matmul']:.2f}x faster", flush=True)
    result = {"command": "python bench/packed_step_profile.py", "cpu": cpu_model(), "threads": torch.get_num_threads(),
              "rows": rows, "finished": time.strftime("%Y-%m-%d %H:%M")}
    (RESULTS / "packed_step_profile.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
