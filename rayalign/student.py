"""A partly-right *student* for the demo and the tests: a tiny model taught addition briefly.

This is data preparation, not the method: a plain PyTorch loop of supervised steps on freshly
generated addition problems (rayalign.tasks), formatted exactly as generation formats them
(chat template, answer, eos). Stopped early, the student answers some prompts right and misses
others by a digit or two, which is what CLAIR's minimal revisions are for.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

from rayalign.models import init_model
from rayalign.tasks import addition_row, vocabulary_texts


def _batch(tokenizer, rng: random.Random, size: int):
    import torch

    from rayalign.train.data import collate, encode_prompt

    items = []
    for _ in range(size):
        row = addition_row(rng.randrange(1000), rng.randrange(1000))
        answer = tokenizer(row["reference"], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        items.append({"prompt_ids": encode_prompt(tokenizer, row["prompt"]), "chosen_ids": answer})
    batch = collate(items, tokenizer.pad_token_id, with_rejected=False)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    return batch["input_ids"], batch["attention_mask"], labels, torch


def train_student(out_dir: str | Path, steps: int = 600, lr: float = 1e-3, batch_size: int = 64,
                  seed: int = 0, log_every: int = 100) -> Path:
    """Build a tiny word-level model and teach it addition for `steps` steps; cached by arguments."""
    out = Path(out_dir)
    recipe = {"steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed}
    marker = out / "student.json"
    if marker.exists() and json.loads(marker.read_text()).get("recipe") == recipe:
        return out
    init_model(out, "tiny", tokenizer_kind="word", seed=seed, texts=vocabulary_texts())

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rng = random.Random(seed)
    started = time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        input_ids, attention, labels, _ = _batch(tokenizer, rng, batch_size)
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % log_every == 0 or step == steps:
            print(f"  student step {step}/{steps}  loss {loss.item():.3f}  {time.perf_counter() - started:.0f}s",
                  flush=True)
    model.save_pretrained(out)
    marker.write_text(json.dumps({"recipe": recipe, "seconds": round(time.perf_counter() - started, 1)}))
    return out


def greedy_accuracy(model_dir: str | Path, rows: list[dict]) -> float:
    """Exact-match accuracy of greedy answers with transformers (a quick check, no engine)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rayalign.clair.verifier import is_correct
    from rayalign.train.data import encode_prompt

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    correct = 0
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([encode_prompt(tokenizer, row["prompt"])])
            out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            correct += is_correct(answer, row["reference"])
    return correct / len(rows)
