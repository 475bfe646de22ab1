"""TRL's DPOTrainer (loss_type="apo_zero", precomputed reference log-probs) on the benchmark pairs.

Run by bench/train_throughput.py with bench/.deps on PYTHONPATH; prints `RESULT {json}`.
Arguments: MODEL PAIRS_DIR OUT_DIR PRECISION STEPS BATCH MICRO_BATCH [MAX_LENGTH, default 256]
The padding fraction counts the padded positions of the policy's training forwards.
"""

import json
import statistics
import sys
import threading
import time
from pathlib import Path

import psutil


def main() -> None:
    model_dir, pairs_dir, out, precision, steps, batch, micro = sys.argv[1:8]
    steps, batch, micro = int(steps), int(batch), int(micro)
    max_length = int(sys.argv[8]) if len(sys.argv) > 8 else 256

    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    started = time.perf_counter()
    peak = [0]

    def sample():
        while True:
            peak[0] = max(peak[0], psutil.Process().memory_info().rss)
            time.sleep(0.2)

    threading.Thread(target=sample, daemon=True).start()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    data = load_dataset("json", data_files=sorted(str(p) for p in Path(pairs_dir).glob("*.jsonl")), split="train")
    data = data.remove_columns([c for c in data.column_names if c not in ("prompt", "chosen", "rejected")])
    # Same formatting as rayalign: the prompt as one user message with the chat template.
    data = data.map(lambda row: {"prompt": [{"role": "user", "content": row["prompt"]}],
                                 "chosen": [{"role": "assistant", "content": row["chosen"]}],
                                 "rejected": [{"role": "assistant", "content": row["rejected"]}]})
    args = DPOConfig(
        output_dir=out, loss_type="apo_zero", beta=0.1, learning_rate=1e-6, max_steps=steps,
        per_device_train_batch_size=micro, gradient_accumulation_steps=batch // micro,
        precompute_ref_log_probs=True, precompute_ref_batch_size=64, max_length=max_length, bf16=precision == "bf16",
        use_cpu=True, report_to="none", save_strategy="no", logging_steps=1, dataloader_num_workers=0,
        lr_scheduler_type="constant", warmup_steps=0,
    )
    step_times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            step_times.append(time.perf_counter() - self.t)

    # TRL computes the reference log-probs inside DPOTrainer's constructor; time that part.
    reference = [0.0]
    precompute = DPOTrainer._precompute_ref_logps

    def timed_precompute(self, *a, **k):
        t0 = time.perf_counter()
        try:
            return precompute(self, *a, **k)
        finally:
            reference[0] += time.perf_counter() - t0

    DPOTrainer._precompute_ref_logps = timed_precompute
    trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, callbacks=[Timer()])
    reference_s = reference[0]
    ready = time.perf_counter() - reference_s
    positions = {"real": 0, "all": 0}

    def count(module, args, kwargs):  # the training forwards' real and padded positions
        mask = kwargs.get("attention_mask")
        if module.training and mask is not None:
            positions["real"] += int(mask.sum())
            positions["all"] += mask.numel()

    model.register_forward_pre_hook(count, with_kwargs=True)
    trainer.train()
    rates = [batch / s for s in step_times]
    steady = statistics.median(rates[3:] if len(rates) > 5 else rates)
    tokens_per_pair = _tokens_per_pair(trainer)
    print("RESULT " + json.dumps({
        "steps": len(step_times), "pairs_per_s": round(steady, 4),
        "tokens_per_s": round(steady * tokens_per_pair, 1), "reference_pass_s": round(reference_s, 1),
        "startup_s": round(ready - started, 1), "peak_rss_gb": round(peak[0] / 1024**3, 2),
        "wall_s": round(time.perf_counter() - started, 1), "dtype": str(dtype),
        "padding_fraction": round(1 - positions["real"] / max(positions["all"], 1), 3)}))


def _tokens_per_pair(trainer) -> float:
    """Non-padding tokens of prompt+chosen and prompt+rejected, averaged over the dataset."""
    ds = trainer.train_dataset
    total = 0
    for row in ds:
        total += 2 * len(row["prompt_ids"]) + len(row["chosen_ids"]) + len(row["rejected_ids"])
    return total / len(ds)


if __name__ == "__main__":
    main()
