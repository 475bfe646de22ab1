"""A partly-right *student* for the demo and the tests: a tiny model taught addition briefly.

This is data preparation, not the method: a plain PyTorch loop of supervised steps on freshly
generated addition problems (rayalign.tasks), formatted exactly as generation formats them
(chat template, answer, eos). Stopped early, the student answers some prompts right and misses
others by a digit or two, which is what CLAIR's minimal revisions are for.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from pathlib import Path

from rayalign.models import init_model
from rayalign.stage import MANIFEST, finish, finished, fingerprint, tree_digest
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
                  seed: int = 0, log_every: int = 100, target_accuracy: float | None = None,
                  check_rows: list[dict] | None = None, attempts: int = 1, start_from: str | Path | None = None) -> Path:
    """Build a tiny word-level model and teach it addition; cached by its arguments.

    Training stops after `steps` steps, or earlier, at a multiple of `log_every`, once greedy
    accuracy on `check_rows` reaches `target_accuracy`. Accuracy jumps suddenly, at a step that
    depends on the seed, and some seeds do not jump within a short run: with `attempts` > 1 a
    student that misses the target is started again from the next seed (seed + 1, ...), and
    the first to reach it is kept (otherwise the last attempt). With `start_from` (a model
    directory, such as another student) teaching continues from that model instead of a new one.
    """
    out = Path(out_dir)
    recipe = {"steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed, "target": target_accuracy,
              "attempts": attempts, "check": fingerprint([r["id"] for r in check_rows or []])}
    if start_from:  # by content: a model taught again at the same path is another start
        recipe["start_from"] = tree_digest(start_from)
    key = fingerprint(recipe)
    if finished(out, key) or _kept_from_before(out, recipe, key, check_rows):
        return out
    # The manifest goes first: a run stopped mid-way must not leave a stale one beside new weights.
    (out / MANIFEST).unlink(missing_ok=True)
    started = time.perf_counter()
    history = []
    for attempt_seed in range(seed, seed + attempts):
        if start_from:
            shutil.rmtree(out, ignore_errors=True)
            shutil.copytree(start_from, out, ignore=shutil.ignore_patterns(MANIFEST, "student.json"))
        else:
            init_model(out, "tiny", tokenizer_kind="word", seed=attempt_seed, texts=vocabulary_texts())
        steps_run, accuracy = _teach(out, steps, lr, batch_size, attempt_seed, log_every, target_accuracy, check_rows)
        history.append({"seed": attempt_seed, "steps_run": steps_run, "accuracy": accuracy})
        if target_accuracy is None or accuracy >= target_accuracy:
            break
        print(f"  student seed {attempt_seed} stayed at {accuracy:.1%}; trying the next seed", flush=True)
    finish(out, "student", key, {"recipe": recipe, **history[-1], "attempts": history,
                                 "seconds": round(time.perf_counter() - started, 1)})
    return out


def _kept_from_before(out: Path, recipe: dict, key: str, check_rows: list[dict] | None) -> bool:
    """A student taught before stage manifests kept its record in student.json: with the same
    recipe (then written with the check prompts' ids hashed as below) it is kept, and its record
    becomes the manifest; student.json stays as it was, so the student's content digest, and the
    reference log-probs and training keyed by it, stay the same. One taught on from another
    model is taught again: its start was recorded by path, not content."""
    path = out / "student.json"
    if "start_from" in recipe or not path.is_file():
        return False
    old = json.loads(path.read_text())
    ids = json.dumps([r["id"] for r in check_rows or []]).encode()
    if old.get("recipe") != {**recipe, "check": hashlib.sha256(ids).hexdigest()[:16]}:
        return False
    finish(out, "student", key, {**{k: v for k, v in old.items() if k != "recipe"}, "recipe": recipe})
    return True


def _teach(out: Path, steps: int, lr: float, batch_size: int, seed: int, log_every: int,
           target_accuracy: float | None, check_rows: list[dict] | None) -> tuple[int, float | None]:
    """Supervised steps on the model saved in `out`; saves it back; returns (steps, accuracy)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    # Linear warmup, then a constant rate: a decaying rate can stall a seed before its jump.
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    rng = random.Random(seed)
    started = time.perf_counter()
    accuracy = None
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
            if target_accuracy is not None:
                accuracy = _accuracy(model.eval(), tokenizer, check_rows)
                model.train()
            shown = f"  accuracy {accuracy:.1%}" if accuracy is not None else ""
            reached = accuracy is not None and accuracy >= target_accuracy
            if step % (5 * log_every) == 0 or step == steps or reached:  # a line every 5 checks
                print(f"  student seed {seed} step {step}/{steps}  loss {loss.item():.3f}{shown}  "
                      f"{time.perf_counter() - started:.0f}s", flush=True)
            if reached:
                break
    model.save_pretrained(out)
    return step, accuracy


def _accuracy(model, tokenizer, rows: list[dict]) -> float:
    """Greedy exact-match accuracy, batched (prompts of one task share a length)."""
    import torch

    from rayalign.clair.verifier import is_correct
    from rayalign.train.data import encode_prompt

    with torch.no_grad():
        ids = torch.tensor([encode_prompt(tokenizer, row["prompt"]) for row in rows])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    answers = tokenizer.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    return sum(is_correct(a, row["reference"]) for a, row in zip(answers, rows)) / len(rows)


def greedy_accuracy(model_dir: str | Path, rows: list[dict]) -> float:
    """Exact-match accuracy of greedy answers with transformers (a quick check, no engine)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return _accuracy(model, AutoTokenizer.from_pretrained(model_dir), rows)
