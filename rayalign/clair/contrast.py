"""Contrastiveness of a preference pair, as the CLAIR paper measures it.

- Token Jaccard similarity of y_w and y_l: |T(y_w) & T(y_l)| / |T(y_w) | T(y_l)| over their
  token *sets* (higher = more minimal contrast). Tokens are words and single punctuation marks
  (regex `\\w+|[^\\w\\s]`), so the figure does not depend on any model's tokenizer.
- Character-level Levenshtein distance (lower = more minimal).
"""

from __future__ import annotations

import re
import statistics

from rapidfuzz.distance import Levenshtein

_TOKEN = re.compile(r"\w+|[^\w\s]")


def tokens(text: str) -> set[str]:
    return set(_TOKEN.findall(text))


def jaccard(a: str, b: str) -> float:
    ta, tb = tokens(a), tokens(b)
    if not ta and not tb:
        return 1.0
    return len(ta & tb) / len(ta | tb)


def levenshtein(a: str, b: str) -> int:
    return Levenshtein.distance(a, b)


def contrast(chosen: str, rejected: str) -> dict:
    return {"jaccard": jaccard(chosen, rejected), "levenshtein": levenshtein(chosen, rejected)}


def describe(values: list[float], bins: int = 10, lo: float | None = None, hi: float | None = None) -> dict:
    """Mean, median and a histogram (counts over equal-width bins from lo to hi)."""
    if not values:
        return {"count": 0, "mean": None, "median": None, "histogram": {"edges": [], "counts": []}}
    lo = min(values) if lo is None else lo
    hi = max(values) if hi is None else hi
    width = (hi - lo) / bins if hi > lo else 1.0
    counts = [0] * bins
    for v in values:
        counts[min(int((v - lo) / width), bins - 1)] += 1
    edges = [lo + i * width for i in range(bins + 1)]
    return {"count": len(values), "mean": statistics.fmean(values), "median": statistics.median(values),
            "histogram": {"edges": edges, "counts": counts}}
