"""A task family with verifiable answers, for the embedded demo and the tests.

Zero-padded 3-digit addition, written one token per digit so a word-level tokenizer sees every
digit: prompt `add: 1 3 7 + 5 8 2`, answer `0 7 1 9` (always four digits). A tiny model learns
it partly, and its mistakes are near misses (usually one carry digit): the kind of answer a
minimal CLAIR revision fixes.
"""

from __future__ import annotations

import random


def _digits(n: int, width: int) -> str:
    return " ".join(f"{n:0{width}d}")


def addition_row(a: int, b: int) -> dict:
    return {
        "id": f"add-{a:03d}-{b:03d}",
        "prompt": f"add: {_digits(a, 3)} + {_digits(b, 3)}",
        "reference": _digits(a + b, 4),
    }


def addition_prompts(n: int, seed: int = 0, exclude: set[str] = frozenset()) -> list[dict]:
    """`n` distinct addition prompts with reference answers, none of whose ids is in `exclude`."""
    if n + len(exclude) > 1000 * 1000:
        raise ValueError(f"only 1,000,000 distinct addition prompts exist, asked for {n}")
    rng = random.Random(seed)
    rows: dict[str, dict] = {}
    while len(rows) < n:
        row = addition_row(rng.randrange(1000), rng.randrange(1000))
        if row["id"] not in exclude:
            rows.setdefault(row["id"], row)
    return list(rows.values())


def vocabulary_texts() -> list[str]:
    """Texts that cover every word of the task, for training a word-level tokenizer."""
    return [" ".join(str(d) for d in range(10)) + " add: + answer:"]
