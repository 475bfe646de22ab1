"""CLAIR's revision and judge prompts, and the parsers that read their answers.

The reviser is asked to improve the answer *minimally*: keep every part it does not correct,
never mention that the answer was revised, reason first, then give the revision between
markers. With structured output the same content comes as JSON that always parses. Templates
are plain `str.format` strings with the fields {prompt}, {answer} (revision) and {prompt},
{answer_a}, {answer_b} (judge); the config can replace them.
"""

from __future__ import annotations

import json
import re

REVISION_MARKERS = ("<revision>", "</revision>")
VERDICT_MARKERS = ("<verdict>", "</verdict>")

REVISION_TEMPLATE = """\
You are reviewing an answer written by a student model. Improve it *minimally*.

Rules:
- Correct only what is wrong, unclear or missing. Keep every sentence, word and formatting choice \
of the original that does not need to change.
- Do not add praise, caveats or commentary, and never mention the original answer, the student, \
or that the answer was revised: the result must read as a fresh answer to the question.
- If the answer needs no change, repeat it exactly.

First think step by step about what must change. Then write the complete improved answer \
between {start} and {end}.

# Question
{prompt}

# Student answer
{answer}
"""

JUDGE_TEMPLATE = """\
Compare two answers to the same question and decide which one is better: more correct, more \
helpful and better written. Judge the content, not the length or the order of presentation.

First explain your reasoning briefly. Then give your verdict between {start} and {end}: A, B, \
or tie.

# Question
{prompt}

# Answer A
{answer_a}

# Answer B
{answer_b}
"""

REVISION_SCHEMA = {
    "type": "object",
    "properties": {"reasoning": {"type": "string"}, "revision": {"type": "string"}},
    "required": ["reasoning", "revision"],
    "additionalProperties": False,
}

VERDICT_SCHEMA = {
    "type": "object",
    "properties": {"reasoning": {"type": "string"}, "verdict": {"type": "string", "enum": ["A", "B", "tie"]}},
    "required": ["reasoning", "verdict"],
    "additionalProperties": False,
}



def bounded(schema: dict, max_chars: int | None) -> dict:
    """The schema with every free string capped at `max_chars` characters, so that even a weak
    model's constrained output closes its JSON within the token limit."""
    if max_chars is None:
        return schema
    properties = {name: ({**p, "maxLength": max_chars} if p.get("type") == "string" and "enum" not in p else p)
                  for name, p in schema["properties"].items()}
    return {**schema, "properties": properties}


STRUCTURED_NOTE = "\nAnswer with a JSON object with the fields {fields}."


class Unparsable(ValueError):
    """The reviser's or judge's text holds no usable answer; the message says why."""


def prompt_text(prompt: str | list[dict]) -> str:
    """A chat prompt rendered as plain text for embedding in a revision or judge prompt."""
    if isinstance(prompt, str):
        return prompt
    return "\n\n".join(f"[{m['role']}] {m['content']}" for m in prompt)


def revision_request(prompt, answer: str, template: str | None = None, structured: bool = False) -> str:
    start, end = REVISION_MARKERS
    text = (template or REVISION_TEMPLATE).format(prompt=prompt_text(prompt), answer=answer, start=start, end=end)
    return text + (STRUCTURED_NOTE.format(fields='"reasoning" and "revision"') if structured else "")


def judge_request(prompt, answer_a: str, answer_b: str, template: str | None = None,
                  structured: bool = False) -> str:
    start, end = VERDICT_MARKERS
    text = (template or JUDGE_TEMPLATE).format(prompt=prompt_text(prompt), answer_a=answer_a,
                                               answer_b=answer_b, start=start, end=end)
    return text + (STRUCTURED_NOTE.format(fields='"reasoning" and "verdict"') if structured else "")


def _marked(text: str, markers: tuple[str, str]) -> str:
    start, end = markers
    # The last complete section wins: models sometimes quote the markers while reasoning.
    found = re.findall(re.escape(start) + r"(.*?)" + re.escape(end), text, flags=re.DOTALL)
    if not found:
        raise Unparsable(f"no {start}...{end} section")
    return found[-1]


def _json_field(text: str, name: str) -> str:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise Unparsable(f"structured output is not valid JSON ({exc.msg})") from None
    if not isinstance(value, dict) or not isinstance(value.get(name), str):
        raise Unparsable(f"structured output has no string field {name!r}")
    return value[name]


def parse_revision(text: str, structured: bool = False) -> str:
    """The revised answer, stripped of surrounding blank lines; raises Unparsable."""
    revision = _json_field(text, "revision") if structured else _marked(text, REVISION_MARKERS)
    return revision.strip("\n").strip()


def parse_verdict(text: str, structured: bool = False) -> str:
    """'A', 'B' or 'tie'; raises Unparsable."""
    raw = _json_field(text, "verdict") if structured else _marked(text, VERDICT_MARKERS)
    verdict = raw.strip().strip(".").lower()
    if verdict in ("a", "b"):
        return verdict.upper()
    if verdict == "tie":
        return "tie"
    raise Unparsable(f"verdict {raw.strip()!r} is not A, B or tie")


def swap_consistent(first: str, second: str) -> str:
    """Combine verdicts from both orders (second asked with A and B swapped): a winner must win
    in both; anything else is a tie, which cancels position bias."""
    unswapped = {"A": "B", "B": "A", "tie": "tie"}[second]
    return first if first == unswapped else "tie"
