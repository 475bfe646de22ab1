"""Tokenized preference pairs: encoding, the truncation policy, collation, and the data order.

Formatting matches generation: the prompt (a text prompt is one user message) is rendered with
the model's chat template and its generation prompt (`<|assistant|>\\n` and so on), exactly what
vLLM saw when the target answered; a tokenizer without a chat template encodes the prompt text
as is. A completion is its tokens followed by the eos token, so the model also learns to stop:
the tokens the target generated when the pair file keeps them (its own answers, from `rayalign
clair`), otherwise the text's tokenization (revisions, imported pairs).

Truncation policy (counted and reported, never silent). A pair whose prompt plus longer
completion fits in `max_length` tokens is kept whole. Otherwise:
1. a prompt longer than `max_prompt_length` keeps its *last* `max_prompt_length` tokens (the
   question sits at the end of a chat; the system prompt and early turns go first);
2. each completion is cut at the end to the room left, `max_length - len(prompt)` (at least
   `max_length - max_prompt_length` >= 1 tokens, so a completion never vanishes);
3. a pair whose truncated chosen and rejected completions are identical cannot teach a
   preference (they differ only past `max_length`) and is skipped with that reason.

Data order. Epoch e visits the pairs in a permutation seeded by (seed, e). Every optimizer step
takes the next `batch_size` pairs of it; the last `len % batch_size` pairs of each epoch form no
full step and are dropped (a different tail each epoch, and counted in the summary). Within a
step, micro-batch m of worker r is the slice number m * num_workers + r of the step's pairs, so
the split is a pure function of (step, rank) and a resumed run replays it exactly.

Packed (train.packing), a step's pairs are packed into micro-batches of at most the token budget
by `pack_step`, every worker getting the same number of them (ZeRO communicates in each
micro-batch, so unequal counts would hang), also a pure function of the step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rayalign.records import prompt_messages


@dataclass
class Encoded:
    id: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]
    # What was cut: any of "prompt", "chosen", "rejected".
    truncated: list[str] = field(default_factory=list)


class Skipped(ValueError):
    """A pair that cannot be trained on; the message is the reason."""


@dataclass
class TokenizeReport:
    rows: list[dict]
    prompts_truncated: int = 0
    completions_truncated: int = 0
    skipped: list[dict] = field(default_factory=list)

    def counts(self) -> dict:
        return {"pairs": len(self.rows), "prompts_truncated": self.prompts_truncated,
                "completions_truncated": self.completions_truncated, "skipped": len(self.skipped)}


def completion_text(value: str | list[dict]) -> str:
    return value if isinstance(value, str) else value[-1]["content"]


def encode_prompt(tokenizer, prompt: str | list[dict]) -> list[int]:
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template(prompt_messages({"prompt": prompt}), add_generation_prompt=True,
                                            tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return tokenizer(prompt if isinstance(prompt, str) else prompt[-1]["content"]).input_ids


def encode_completion(tokenizer, row: dict, side: str) -> list[int]:
    """The tokens of `row[side]` followed by eos: the ids the model generated for it when the
    pair file keeps them (`metadata.<side>_token_ids`) and they decode to the text, else the
    text's own tokenization (which differs from a model's sample now and then: SmolLM2 once
    wrote "Beiroth" as "Be"+"iroth" where the text tokenizes as "Bei"+"roth")."""
    text = completion_text(row[side])
    eos = tokenizer.eos_token_id
    generated = (row.get("metadata") or {}).get(f"{side}_token_ids")
    if generated and tokenizer.decode(generated, skip_special_tokens=True) == text:
        ids = list(generated)
        return ids if ids[-1] == eos else ids + [eos]
    return tokenizer(text, add_special_tokens=False).input_ids + [eos]


def encode_pair(tokenizer, row: dict, max_length: int, max_prompt_length: int) -> Encoded:
    """Encode one pair under the truncation policy of the module docstring; raise Skipped."""
    prompt = encode_prompt(tokenizer, row["prompt"])
    chosen = encode_completion(tokenizer, row, "chosen")
    rejected = encode_completion(tokenizer, row, "rejected")
    cut = []
    if len(prompt) + max(len(chosen), len(rejected)) > max_length:
        if len(prompt) > max_prompt_length:
            prompt = prompt[-max_prompt_length:]
            cut.append("prompt")
        room = max_length - len(prompt)
        if len(chosen) > room:
            chosen = chosen[:room]
            cut.append("chosen")
        if len(rejected) > room:
            rejected = rejected[:room]
            cut.append("rejected")
    if chosen == rejected:
        raise Skipped(f"chosen and rejected differ only after max_length ({max_length} tokens): "
                      "truncated, they are identical")
    return Encoded(row["id"], prompt, chosen, rejected, cut)


def tokenize_pairs(tokenizer, rows: list[dict], max_length: int, max_prompt_length: int) -> TokenizeReport:
    """Encode every pair; `index` keeps the file order, skipped pairs are listed with the reason."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token, so completions cannot end")
    report = TokenizeReport(rows=[])
    for row in rows:
        try:
            enc = encode_pair(tokenizer, row, max_length, max_prompt_length)
        except Skipped as skip:
            report.skipped.append({"id": row["id"], "reason": str(skip), "row": row})
            continue
        report.prompts_truncated += "prompt" in enc.truncated
        report.completions_truncated += "chosen" in enc.truncated or "rejected" in enc.truncated
        report.rows.append({"index": len(report.rows), "id": enc.id, "prompt_ids": enc.prompt_ids,
                            "chosen_ids": enc.chosen_ids, "rejected_ids": enc.rejected_ids,
                            "truncated": bool(enc.truncated)})
    return report


def collate(pairs: list[dict], pad_id: int, with_rejected: bool = True):
    """Right-padded tensors for one concatenated forward: rows 0..B-1 are prompt+chosen, rows
    B..2B-1 prompt+rejected. `completion_mask` marks completion tokens."""
    import torch

    sequences = [(list(p["prompt_ids"]), list(p["chosen_ids"])) for p in pairs]
    if with_rejected:
        sequences += [(list(p["prompt_ids"]), list(p["rejected_ids"])) for p in pairs]
    width = max(len(a) + len(b) for a, b in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    completion = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, (prompt, answer) in enumerate(sequences):
        n = len(prompt) + len(answer)
        input_ids[i, :n] = torch.tensor(prompt + answer)
        attention[i, :n] = 1
        completion[i, len(prompt):n] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion}


# ---- data order ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Schedule:
    """Which pairs each optimizer step, worker and micro-batch takes (see the module docstring)."""

    num_pairs: int
    batch_size: int
    micro_batch_size: int
    num_workers: int
    epochs: int
    seed: int
    # Token length of each pair (its longer sequence). When given, each step's pairs are ordered
    # by length before they are cut into micro-batches, so a micro-batch is padded less; the
    # pairs of a step, and so its gradient, stay the same.
    lengths: tuple[int, ...] | None = None
    # Packing (train.packing): each pair's tokens in a packed row (pair_tokens) and the most tokens
    # in a micro-batch.
    tokens: tuple[int, ...] | None = None
    token_budget: int | None = None

    @property
    def steps_per_epoch(self) -> int:
        return self.num_pairs // self.batch_size

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    @property
    def dropped_per_epoch(self) -> int:
        return self.num_pairs % self.batch_size

    @property
    def accumulation(self) -> int:
        return self.batch_size // (self.micro_batch_size * self.num_workers)

    def epoch_order(self, epoch: int) -> list[int]:
        import numpy as np

        return np.random.default_rng([self.seed, epoch]).permutation(self.num_pairs).tolist()

    def step_indices(self, step: int) -> list[int]:
        """Pair indices of optimizer step `step` (0-based), in order."""
        epoch, j = divmod(step, self.steps_per_epoch)
        return self.epoch_order(epoch)[j * self.batch_size:(j + 1) * self.batch_size]

    def micro_batches(self, step: int, rank: int) -> list[list[int]]:
        """The micro-batches worker `rank` runs in step `step`: `accumulation` of them, or packed
        (when `token_budget` is set) as many as every other worker."""
        indices = self.step_indices(step)
        if self.token_budget is not None:
            return pack_step(indices, self.tokens, self.token_budget, self.num_workers)[rank]
        if self.lengths is not None:
            indices = sorted(indices, key=lambda i: self.lengths[i])  # stable: ties keep step order
        size = self.micro_batch_size
        return [indices[(m * self.num_workers + rank) * size:(m * self.num_workers + rank + 1) * size]
                for m in range(self.accumulation)]


def pair_tokens(pair: dict, share_prefix: bool = False) -> int:
    """The tokens of a pair's two sequences, prompt+chosen and prompt+rejected: its share of a
    packed row; with `share_prefix`, the prompt and the answers' common beginning once."""
    total = len(pair["prompt_ids"]) + len(pair["chosen_ids"]) + len(pair["rejected_ids"])
    return total - (shared_prefix(pair) if share_prefix else -len(pair["prompt_ids"]))


def shared_prefix(pair: dict) -> int:
    """How many leading tokens chosen and rejected have in common."""
    chosen, rejected = pair["chosen_ids"], pair["rejected_ids"]
    k, most = 0, min(len(chosen), len(rejected))
    while k < most and chosen[k] == rejected[k]:
        k += 1
    return k


def pack_step(indices: list[int], tokens, budget: int, workers: int) -> list[list[list[int]]]:
    """A step's pairs (`indices`, with `tokens[i]` the tokens of pair i) as micro-batches of at most
    `budget` tokens, per worker: every worker gets the same number of micro-batches.

    First-fit decreasing packs the pairs; while the count is not a multiple of `workers`, the
    micro-batch with the most tokens among those of two or more pairs is halved (a step has a
    multiple of `workers` pairs, so this ends at one pair each at worst). Then the micro-batches
    go, longest first, to the worker with the fewest tokens that still has room, so the workers'
    loads are close. Within a micro-batch the pairs keep their order in the step."""
    order = {i: position for position, i in enumerate(indices)}
    too_long = [i for i in indices if tokens[i] > budget]
    if too_long:
        raise ValueError(f"pair {too_long[0]} has {tokens[too_long[0]]} tokens, more than a packed micro-batch "
                         f"holds ({budget})")
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(indices, key=lambda i: (-tokens[i], order[i])):
        for b, load in enumerate(loads):
            if load + tokens[i] <= budget:
                bins[b].append(i)
                loads[b] += tokens[i]
                break
        else:
            bins.append([i])
            loads.append(tokens[i])
    while len(bins) % workers:
        b = max((b for b in range(len(bins)) if len(bins[b]) > 1), key=lambda b: (loads[b], -b))
        halves: list[list[int]] = [[], []]
        half_loads = [0, 0]
        for i in sorted(bins[b], key=lambda i: (-tokens[i], order[i])):  # each pair to the lighter half
            h = 0 if half_loads[0] <= half_loads[1] else 1
            halves[h].append(i)
            half_loads[h] += tokens[i]
        bins[b:b + 1] = halves
        loads[b:b + 1] = half_loads
    per_worker = len(bins) // workers
    assigned: list[list[list[int]]] = [[] for _ in range(workers)]
    totals = [0] * workers
    for b in sorted(range(len(bins)), key=lambda b: (-loads[b], b)):
        rank = min((r for r in range(workers) if len(assigned[r]) < per_worker), key=lambda r: (totals[r], r))
        assigned[rank].append(sorted(bins[b], key=order.__getitem__))
        totals[rank] += loads[b]
    return assigned
