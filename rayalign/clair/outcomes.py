"""Units of work, their outcomes, and exactly-once output for the CLAIR stage.

A *unit* is one preference pair to attempt: (prompt, sample index). Every unit ends in exactly
one place: the pairs directory or the rejects directory, each a set of shards written
atomically and named by a hash of the unit ids they hold, so a retried writer rewrites the
same shard instead of adding a duplicate. A rerun reads the ids already written and sends only
the rest. Units deferred by a token budget are written nowhere and stay pending.

Rows travel through Ray Data flat, with the prompt as a JSON string (`prompt_json`) so text and
chat prompts can share a column.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable, Iterable

from rayalign import records
from rayalign.clair.contrast import contrast

# Reject reasons (the `reason` column); `detail` says more in words.
REASONS = (
    "generation_failed",  # the target model produced no answer (engine error, prompt too long)
    "answer_too_long",    # the target's answer hit max_tokens
    "request_failed",     # the reviser or judge endpoint failed after its retries
    "unparsable",         # no marked revision / verdict in the reviser's or judge's output
    "revision_too_long",  # the reviser's output hit max_tokens
    "empty_revision",
    "identical",          # the revision equals the original (the answer needed no change)
    "already_correct",    # the verifier found the final answer right: nothing to revise
    "no_answer",          # the verifier found no final answer in the response to correct
    "no_reference",       # the verifier needs a reference answer
    "tie",                # the judge preferred neither sample
)
DEFERRED = "deferred"     # not sent (token budget); neither a pair nor a reject


def unit_id(prompt_id: str, sample: int, samples: int) -> str:
    return prompt_id if samples == 1 else f"{prompt_id}#{sample}"


def unit_seed(base_seed: int, uid: str) -> int:
    """A per-unit sampling seed, stable across runs, so a redone unit gets the same answer."""
    digest = hashlib.sha256(f"{base_seed}:{uid}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def make_units(prompts: list[dict], samples: int, seed: int) -> list[dict]:
    units = []
    for row in prompts:
        for k in range(samples):
            uid = unit_id(row["id"], k, samples)
            units.append({
                "unit_id": uid, "prompt_id": row["id"], "prompt_json": json.dumps(row["prompt"]),
                "reference": row.get("reference") or "", "sample": k, "seed": unit_seed(seed, uid),
            })
    return units


def completed_ids(out_dir: Path) -> set[str]:
    """Ids of units already in pairs or rejects, from earlier runs."""
    done: set[str] = set()
    for kind, key in (("pairs", "id"), ("rejects", "id")):
        folder = out_dir / kind
        if folder.exists() and any(folder.iterdir()):
            for record in records.read_records(folder):
                if record.value is not None:
                    done.add(record.value[key])
    return done


def pair_row(row: dict, chosen: str, rejected: str, source: str, reviser: str) -> dict:
    """A pair in TRL's layout; the reviser's or judge's full output is kept in metadata, and so
    are the token ids the target generated for a side that is its own answer
    (`rejected_token_ids`, `chosen_token_ids`), so training scores exactly those tokens."""
    prompt = json.loads(row["prompt_json"])
    conversational = isinstance(prompt, list)
    wrap = (lambda text: [{"role": "assistant", "content": text}]) if conversational else (lambda text: text)
    # Ray Data hands list columns over as arrays: test by length, not truth.
    generated = {row.get(text): row[ids] for text, ids in (("answer_b", "answer_b_token_ids"),
                                                           ("answer", "answer_token_ids"))
                 if row.get(ids) is not None and len(row[ids])}
    token_ids = {f"{side}_token_ids": [int(t) for t in generated[text]]
                 for side, text in (("chosen", chosen), ("rejected", rejected)) if text in generated}
    return {
        "id": row["unit_id"], "prompt": prompt, "chosen": wrap(chosen), "rejected": wrap(rejected),
        "source": source, "reviser": reviser, **contrast(chosen, rejected),
        "metadata": {"prompt_id": row["prompt_id"], "sample": int(row["sample"]),
                     **({"reviser_output": row["raw"]} if row.get("raw") else {}), **token_ids},
    }


def reject_row(row: dict, reason: str, detail: str, raw: str = "") -> dict:
    assert reason in REASONS, reason
    return {"id": row["unit_id"], "prompt_id": row["prompt_id"], "reason": reason, "detail": detail,
            "raw": raw, "prompt": json.loads(row["prompt_json"]), "answer": row.get("answer") or ""}


class ShardWriter:
    """Ray Data batch function: writes one batch's pairs and rejects, returns one count row.

    Each batch row carries `outcome` ('pair', a reason, or 'deferred') and the fields that
    outcome needs (built by the revision stage).
    """

    def __init__(self, out_dir: str, fmt: str, source: str, reviser: str):
        self.out_dir, self.fmt, self.source, self.reviser = Path(out_dir), fmt, source, reviser

    def __call__(self, batch: dict) -> dict:
        return {key: [value] for key, value in self.write(batch_rows(batch)).items()}

    def write(self, rows: list[dict]) -> dict:
        """Write `rows` as one shard of pairs and one of rejects; the counts of what was written."""
        pairs, rejects, deferred = [], [], 0
        for row in rows:
            if row["outcome"] == "pair":
                pairs.append(pair_row(row, row["chosen"], row["rejected"], self.source, self.reviser))
            elif row["outcome"] == DEFERRED:
                deferred += 1
            else:
                rejects.append(reject_row(row, row["outcome"], row["detail"], row.get("raw") or ""))
        for kind, items in (("pairs", pairs), ("rejects", rejects)):
            if items:
                name = hashlib.sha256("\n".join(sorted(r["id"] for r in items)).encode()).hexdigest()[:20]
                records.write_shard(items, self.out_dir / kind / f"part-{name}.{self.fmt}")
        generated = sum(int(r.get("answer_tokens") or 0) for r in rows)
        revised = sum(int(r.get("reviser_tokens") or 0) for r in rows)
        return {"pairs": len(pairs), "rejects": len(rejects), "deferred": deferred,
                "generated_tokens": generated, "reviser_tokens": revised}


def batch_rows(batch: dict) -> list[dict]:
    """A Ray Data batch (columns, numpy or lists) as rows of plain Python values."""
    columns = {k: (v.tolist() if hasattr(v, "tolist") else list(v)) for k, v in batch.items()}
    return [dict(zip(columns, values)) for values in zip(*columns.values())]


def commit_stream(batches: Iterable[dict], writer: ShardWriter, rows_per_shard: int, seconds: float,
                  clock: Callable[[], float] = time.monotonic) -> list[dict]:
    """Write the rows of `batches` (as they arrive from the running pipeline) in shards: one as
    soon as `rows_per_shard` rows are waiting, and whatever is waiting once `seconds` have passed
    since the last shard. A crash therefore loses at most that window of finished units (and the
    units still in flight); a rerun sends only those again. Returns each shard's counts."""
    counts, waiting, last = [], [], clock()
    for batch in batches:
        waiting.extend(batch_rows(batch))
        while len(waiting) >= rows_per_shard:
            counts.append(writer.write(waiting[:rows_per_shard]))
            waiting, last = waiting[rows_per_shard:], clock()
        if waiting and clock() - last >= seconds:
            counts.append(writer.write(waiting))
            waiting, last = [], clock()
    if waiting:
        counts.append(writer.write(waiting))
    return counts
