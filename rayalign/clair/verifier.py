"""The verifier: a reviser and a judge for prompts with a reference answer, no model needed.

Normalisation (also used by exact-match evaluation): Unicode NFKC, case folded, surrounding
whitespace and a trailing period removed, inner whitespace collapsed to one space.

The *final answer* of a response is found in one of three ways:
- with an `answer_pattern` (a regex with one group, such as `answer:\\s*(.+)`): that group's last
  match;
- a response that says the reference and nothing else (after normalisation): all of it but the
  surrounding spaces and final punctuation;
- a reference of several numbers (a digit task's `0 7 1 9`): the whole response;
- otherwise the answer span found in the response ("23 + 24 equals 58.", "Seven apples.",
  "It's Paris."), or, in a short response (no more words than the reference plus one), the
  whole response where no span is found. For a numeric
  reference, the last number written in digits or words ("58", "twenty-five", "twice") that is
  not a number of the question. Otherwise, whichever comes first of the first quoted phrase that
  is not the question's (`The opposite of "up" is "down"`) and the words not in the question
  right after the first "is", "are", "was", "were", "equals", "makes", "gives", "it's", "=" or
  ":" (`The capital of Kenya is Nairobi.`);
  else the first run of words not in the question (`Moscow is the capital of Russia.`). A span
  longer than the reference by more than one word is a description, not an answer. So an
  answer that only repeats words of the question cannot be found, and a response with no such
  span has no final answer.

The minimal revision replaces the wrong answer, and each repetition of it, by the reference
(in words where the response wrote it in words), keeping everything else.
"""

from __future__ import annotations

import re
import unicodedata

from rapidfuzz.distance import Levenshtein


def normalize(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).casefold().strip()
    text = re.sub(r"\s+", " ", text)
    return text[:-1].rstrip() if text.endswith(".") else text


# ---- numbers in digits and words ---------------------------------------------------------------

_UNITS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
          "sixteen seventeen eighteen nineteen").split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()
_ADVERBS = {"once": 1, "twice": 2}
_WORD_NUMBER = (r"(?:" + "|".join(_TENS) + r")(?:[- ](?:" + "|".join(_UNITS[1:10]) + r"))?|"
                + "|".join(sorted(_UNITS + list(_ADVERBS), key=len, reverse=True)))
# Digits, or number words that are not part of a longer hyphenated word ("three-fourths").
_NUMBER = re.compile(r"(?<![\w.,])-?\d+(?:,\d{3})*(?:\.\d+)?(?![\w]|[.,]\d)|(?<![\w-])(?:" + _WORD_NUMBER
                     + r")(?![\w-])", re.IGNORECASE)


def number_value(text: str) -> float | None:
    """The value of a number written in digits ("1,024", "-3.5") or words ("twenty-one",
    "twice"), or None."""
    word = text.strip().casefold()
    if word in _ADVERBS:
        return float(_ADVERBS[word])
    if word in _UNITS:
        return float(_UNITS.index(word))
    tens, _, unit = re.sub(r"[- ]+", " ", word).partition(" ")
    if tens in _TENS and (not unit or unit in _UNITS[1:10]):
        return float(20 + 10 * _TENS.index(tens) + (_UNITS.index(unit) if unit else 0))
    try:
        return float(word.replace(",", ""))
    except ValueError:
        return None


def _in_words(value: float, like: str) -> str:
    """`value` written the way `like` writes numbers: digits, or words for 0-99 ("Twenty-one"
    after a capitalised word), with "once"/"twice" becoming "N times" for other values."""
    n = int(value)
    word = like.strip().casefold()
    if value != n or re.fullmatch(r"-?[\d,.]+", word) or not 0 <= n < 100:
        return f"{value:g}" if value != n else str(n)
    if word in _ADVERBS:
        adverb = {v: k for k, v in _ADVERBS.items()}.get(n)
        return adverb or f"{n} times"
    text = _UNITS[n] if n < 20 else _TENS[n // 10 - 2] + (f"-{_UNITS[n % 10]}" if n % 10 else "")
    return text.capitalize() if like[:1].isupper() else text


# ---- finding the final answer ----------------------------------------------------------------

_WORD = re.compile(r"\w[\w'’-]*")
_QUOTED = re.compile(r"[\"“”]([^\"“”\n]{1,80})[\"“”]")
_COPULA = re.compile(r"\b(?:is|are|was|were|equals|makes|gives|(?:it|that)['’]s)\b|[=:]", re.IGNORECASE)
_BREAK = re.compile(r"[.,;:!?()\[\]\"“”\n]")
# Words that are never an answer on their own: articles and the copulas themselves.
_ARTICLES = {"a", "an", "the"}
_FILLER = _ARTICLES | {"is", "are", "was", "were", "equals", "makes", "gives"}


def _words(text: str) -> list[str]:
    return [w.casefold() for w in _WORD.findall(text)]


_DIGIT_SEQUENCE = re.compile(r"\s*\d+(?:\s+\d+)+\s*")


def _numeric(reference: str) -> bool:
    return re.fullmatch(r"\s*-?\d+(?:,\d{3})*(?:\.\d+)?\s*", reference) is not None


def _trimmed(response: str, start: int, end: int) -> tuple[int, int]:
    """The span without surrounding spaces and trailing punctuation ("slow." -> "slow")."""
    while start < end and response[start].isspace():
        start += 1
    while end > start and (response[end - 1].isspace() or response[end - 1] in ".,;:!?"):
        end -= 1
    return start, end


def _new_words(response: str, known: set[str], start: int = 0) -> tuple[int, int] | None:
    """The first run of words from `start` on that are not in `known`, within one clause."""
    run = None
    for match in _WORD.finditer(response, start):
        if match.group().casefold() in known:
            if run:
                break
            continue
        if run and _BREAK.search(response, run[1], match.start()):
            break
        run = (run[0] if run else match.start(), match.end())
    return run


def _number_span(response: str, question: str) -> tuple[int, int] | None:
    asked = {number_value(m.group()) for m in _NUMBER.finditer(question)}
    found = [m for m in _NUMBER.finditer(response) if number_value(m.group()) not in asked]
    return found[-1].span() if found else None


def _after_copula(response: str, known: set[str]) -> tuple[int, int] | None:
    """The new words right after the first copula ("... is Nairobi"), articles aside; None when
    the copula is followed by the question's own words ("Moscow is the capital of Russia")."""
    copula = _COPULA.search(response)
    if copula is None:
        return None
    following = next((m for m in _WORD.finditer(response, copula.end()) if m.group().casefold() not in _ARTICLES),
                     None)
    if following is None or following.group().casefold() in known:
        return None
    return _new_words(response, known, following.start())


def _prose_span(response: str, reference: str, question: str) -> tuple[int, int] | None:
    known = set(_words(question)) | _FILLER
    quoted = next((m.span(1) for m in _QUOTED.finditer(response) if set(_words(m.group(1))) - known), None)
    copula = _after_copula(response, known)
    # Whichever comes first: `is "down" in maths` is the quoted word; `is Vilnius, "Vilnius"
    # in Lithuanian` the words after the copula.
    if quoted and copula:
        span = quoted if quoted[0] <= copula[0] + 1 else copula
    else:
        span = quoted or copula or _new_words(response, known)
    if span is None:
        return None
    span = _trimmed(response, *span)
    # A longer run is a description, not an answer ("largest European country"), though an
    # answer may carry one qualifier ("predominantly Portuguese", "Sao Paulo" for Brasilia).
    return span if len(_words(response[span[0]:span[1]])) <= len(_words(reference)) + 1 else None


def answer_span(response: str, reference: str, pattern: str | None = None,
                question: str = "") -> tuple[int, int] | None:
    """Start and end of the final answer in `response` (see the module docstring), or None
    when there is none. `question` is the prompt's text: its words and numbers are never the answer."""
    if pattern is not None:
        matches = list(re.finditer(pattern, response, flags=re.MULTILINE))
        return matches[-1].span(1) if matches else None
    if _DIGIT_SEQUENCE.fullmatch(reference):
        return (0, len(response))
    if normalize(response) == normalize(reference):
        return _trimmed(response, 0, len(response))
    span = _number_span(response, question) if _numeric(reference) else _prose_span(response, reference, question)
    if span is None and len(response.split()) <= len(reference.split()) + 1:
        return (0, len(response))
    return span


def _same(answer: str, reference: str, whole: bool) -> bool:
    """Whether the answer span says the reference. In prose the span may carry a qualifier
    around it ("predominantly Portuguese", "Mandarin Chinese")."""
    if _numeric(reference):
        value = number_value(answer)
        return value is not None and value == number_value(reference)
    if whole:
        return normalize(answer).strip("\"'“”‘’ ") == normalize(reference)
    said, expected = _words(normalize(answer)), _words(normalize(reference))
    return any(said[i:i + len(expected)] == expected for i in range(len(said) - len(expected) + 1))


def is_correct(response: str, reference: str, pattern: str | None = None, question: str = "") -> bool:
    span = answer_span(response, reference, pattern, question)
    return span is not None and _same(response[span[0]:span[1]], reference, _whole(span, response, pattern))


def _whole(span: tuple[int, int], response: str, pattern: str | None) -> bool:
    return pattern is not None or span == (0, len(response))


def revise(response: str, reference: str, pattern: str | None = None, question: str = "") -> str | None:
    """The minimal edit of `response` that makes it correct: the final answer replaced by the
    reference (the response itself when it is already correct). None when no final answer is found."""
    span = answer_span(response, reference, pattern, question)
    if span is None:
        return None
    wrong = response[span[0]:span[1]]
    if _same(wrong, reference, _whole(span, response, pattern)):
        return response
    if _whole(span, response, pattern):
        return response[:span[0]] + reference + response[span[1]:]
    if _numeric(reference):
        # Every mention of the wrong value goes ("... is 58. So 23 + 24 = 58."; "4 ... four legs"),
        # each in its own form, with "time"/"times" after it agreeing.
        value, right = number_value(wrong), number_value(reference)
        asked = {number_value(m.group()) for m in _NUMBER.finditer(question)}

        def fix(match: re.Match) -> str:
            number = match.group(1)
            if number_value(number) != value or value in asked:
                return match.group()
            text = _in_words(right, number)
            times = match.group(2)
            if times and not text.endswith("times"):
                times = " time" if right == 1 else " times"
            return text + (times or "")

        return re.sub(f"({_NUMBER.pattern})( times?\\b)?", fix, response, flags=re.IGNORECASE)
    # A quoted answer is replaced wherever it is quoted again ('is "weak" or "weak" is ...').
    quoted = span[0] > 0 and response[span[0] - 1] in "\"“”"
    if quoted:
        return re.sub(r"(?<=[\"“”])" + re.escape(wrong) + r"(?=[.,;:!?]?[\"“”])", lambda _: reference, response)
    return response[:span[0]] + reference + response[span[1]:]


def score(response: str, reference: str, pattern: str | None = None, question: str = "") -> float:
    """1.0 when correct; otherwise in [0, 1), higher the closer the final answer is to the
    reference by normalised character edit distance. Used to judge two samples."""
    span = answer_span(response, reference, pattern, question)
    if span is None:
        return 0.0
    answer = response[span[0]:span[1]]
    if _same(answer, reference, _whole(span, response, pattern)):
        return 1.0
    return 0.999 * (1.0 - Levenshtein.normalized_distance(normalize(answer), normalize(reference)))
