"""The verifier: a reviser and a judge for prompts with a reference answer, no model needed.

Normalisation (also used by exact-match evaluation): Unicode NFKC, case folded, surrounding
whitespace and a trailing period removed, inner whitespace collapsed to one space.

The *final answer* of a response is, by default, the whole response. With an `answer_pattern`
(a regex with one group, such as `answer:\\s*(.+)`), it is that group's last match, and the
minimal revision replaces exactly that span with the reference, keeping everything else.
"""

from __future__ import annotations

import re
import unicodedata

from rapidfuzz.distance import Levenshtein


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold().strip()
    text = re.sub(r"\s+", " ", text)
    return text[:-1].rstrip() if text.endswith(".") else text


def answer_span(response: str, pattern: str | None = None) -> tuple[int, int] | None:
    """Start and end of the final answer in `response`, or None when the pattern finds none."""
    if pattern is None:
        return (0, len(response))
    matches = list(re.finditer(pattern, response, flags=re.MULTILINE))
    return matches[-1].span(1) if matches else None


def is_correct(response: str, reference: str, pattern: str | None = None) -> bool:
    span = answer_span(response, pattern)
    return span is not None and normalize(response[span[0]:span[1]]) == normalize(reference)


def revise(response: str, reference: str, pattern: str | None = None) -> str | None:
    """The minimal edit of `response` that makes it correct: the final answer span replaced by
    the reference (the response itself when it is already correct). None when the pattern
    finds no final answer to correct."""
    span = answer_span(response, pattern)
    if span is None:
        return None
    if normalize(response[span[0]:span[1]]) == normalize(reference):
        return response
    return response[:span[0]] + reference + response[span[1]:]


def score(response: str, reference: str, pattern: str | None = None) -> float:
    """1.0 when correct; otherwise in [0, 1), higher the closer the final answer is to the
    reference by normalised character edit distance. Used to judge two samples."""
    span = answer_span(response, pattern)
    if span is None:
        return 0.0
    answer = normalize(response[span[0]:span[1]])
    target = normalize(reference)
    if answer == target:
        return 1.0
    return 0.999 * (1.0 - Levenshtein.normalized_distance(answer, target))
