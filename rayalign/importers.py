"""Import existing preference data as rayalign pair files.

Layouts:

- ``trl``: rows already hold ``prompt``, ``chosen`` and ``rejected`` (text or conversational).
- ``ultrafeedback``: UltraFeedback-binarized rows: ``prompt`` (text), ``prompt_id``, and
  ``chosen``/``rejected`` as full conversations ending with the assistant's answer. The pair's
  prompt is the conversation before that answer, which must be the same in both and whose first
  user message must equal ``prompt``; chosen and rejected become the one-message answers. The id
  is ``prompt_id``; when a ``prompt_id`` repeats in the file (several pairs per prompt), its
  second occurrence gets ``<prompt_id>-1``, its third ``<prompt_id>-2``, and so on, counted in
  file order over all rows, so ids do not depend on which rows are bad. ``messages`` is
  dropped, since it repeats ``chosen``.
- ``implicit``: no prompt column; ``chosen`` and ``rejected`` are whole conversations or whole
  Anthropic-HH texts ("\\n\\nHuman: ...\\n\\nAssistant: ..."). The prompt is their longest
  common prefix of messages; for text, their common prefix up to and including its last
  "\\n\\nAssistant:". The completions are the rest, kept verbatim.
- ``auto``: picks one of the above from the first JSON object in the file.

Columns outside the pair schema (such as ``score_chosen``) move into ``metadata``. Rows without
a ``source`` get ``source="offpolicy"``: imported pairs were not sampled from the model being
trained. Bad rows are quarantined or raised exactly as by ``records.load_pairs``.
"""

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from rayalign.records import (PAIR_FIELDS, BadRow, DataError, json_type, normalise_messages,
                              validate_file, write_rows)

LAYOUTS = ("auto", "trl", "ultrafeedback", "implicit")
HH_ASSISTANT = "\n\nAssistant:"


@dataclass
class ImportSummary:
    layout: str
    read: int
    good: int
    bad: int
    paths: list[Path]


def import_pairs(src: str | os.PathLike, out_dir: str | os.PathLike, layout: str = "auto",
                 fmt: str = "jsonl", quarantine: str | os.PathLike | None = None,
                 rows_per_shard: int | None = None) -> ImportSummary:
    """Convert the preference data in `src` to pair shards in `out_dir`.

    Nothing is written when a bad row is found without `quarantine`: DataError lists them all.
    """
    if layout not in LAYOUTS:
        raise DataError(f"unknown import layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    convert = _Converter(layout)
    report = validate_file(src, "pairs", quarantine, convert=convert)
    if report.problems and quarantine is None:
        raise report.error()
    paths = write_rows(report.rows, out_dir, fmt, rows_per_shard)
    return ImportSummary(convert.layout or layout, report.read, report.good, report.bad, paths)


def detect_layout(obj: dict) -> str:
    chosen = obj.get("chosen")
    if obj.get("prompt") is None and "chosen" in obj and "rejected" in obj:
        return "implicit"
    if isinstance(obj.get("prompt"), str) and isinstance(chosen, list) and any(
            isinstance(m, dict) and m.get("role") == "user" for m in chosen):
        return "ultrafeedback"
    return "trl"


class _Converter:
    """Turns each foreign row into a pair row; under "auto" the first row fixes the layout."""

    def __init__(self, layout: str):
        self.layout = None if layout == "auto" else layout
        self.prompt_ids = Counter()

    def __call__(self, obj: dict) -> dict:
        if self.layout is None:
            self.layout = detect_layout(obj)
        if self.layout == "trl":
            return from_trl(obj)
        if self.layout == "implicit":
            return from_implicit(obj)
        prompt_id = obj.get("prompt_id")
        occurrence = self.prompt_ids[str(prompt_id)]
        self.prompt_ids[str(prompt_id)] += 1
        return from_ultrafeedback(obj, occurrence)


def from_trl(obj: dict) -> dict:
    return _finish({}, obj)


def from_ultrafeedback(obj: dict, occurrence: int = 0) -> dict:
    """One UltraFeedback-binarized row as a conversational pair; `occurrence` counts earlier
    rows with the same prompt_id."""
    text = obj.get("prompt")
    if text is None:
        raise BadRow("missing field 'prompt'")
    if not isinstance(text, str):
        raise BadRow(f"'prompt' must be a string, not {json_type(text)}")
    chosen, rejected = _conversation(obj, "chosen"), _conversation(obj, "rejected")
    prompt = chosen[:-1]
    if rejected[:-1] != prompt:
        raise BadRow("chosen and rejected conversations differ before the final answer")
    first_user = next((m["content"] for m in prompt if m["role"] == "user"), None)
    if first_user is None or first_user.strip() != text.strip():
        raise BadRow("'prompt' does not match the first user message of chosen")
    pair = {"prompt": prompt, "chosen": chosen[-1:], "rejected": rejected[-1:]}
    prompt_id = obj.get("prompt_id")
    if prompt_id is not None:
        # A bad prompt_id type is left for the row check to report.
        suffixable = isinstance(prompt_id, (str, int)) and not isinstance(prompt_id, bool)
        pair["id"] = f"{prompt_id}-{occurrence}" if occurrence and suffixable else prompt_id
    return _finish(pair, obj, dropped=("prompt_id", "messages"))


def from_implicit(obj: dict) -> dict:
    if obj.get("prompt") is not None:
        raise BadRow("the implicit layout takes no 'prompt' field; use layout 'trl'")
    chosen, rejected = obj.get("chosen"), obj.get("rejected")
    for name, value in (("chosen", chosen), ("rejected", rejected)):
        if value is None:
            raise BadRow(f"missing field '{name}'")
    if chosen == rejected:
        raise BadRow("chosen is identical to rejected")
    if isinstance(chosen, str) and isinstance(rejected, str):
        shared = os.path.commonprefix([chosen, rejected])
        cut = shared.rfind(HH_ASSISTANT)
        if cut < 0:
            raise BadRow(f"no {HH_ASSISTANT!r} in the text shared by chosen and rejected")
        n = cut + len(HH_ASSISTANT)
    elif isinstance(chosen, list) and isinstance(rejected, list):
        chosen = normalise_messages(chosen, "chosen")
        rejected = normalise_messages(rejected, "rejected")
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
    else:
        raise BadRow("chosen and rejected must both be text or both be message lists")
    return _finish({"prompt": chosen[:n], "chosen": chosen[n:], "rejected": rejected[n:]}, obj)


def _conversation(obj: dict, name: str) -> list[dict]:
    value = obj.get(name)
    if value is None:
        raise BadRow(f"missing field '{name}'")
    if not isinstance(value, list):
        raise BadRow(f"'{name}' must be a list of messages, not {json_type(value)}")
    messages = normalise_messages(value, name)
    if messages[-1]["role"] != "assistant":
        raise BadRow(f"'{name}' must end with an assistant message")
    return messages


def _finish(pair: dict, obj: dict, dropped: tuple[str, ...] = ()) -> dict:
    """Add the pair fields of `obj` that `pair` lacks, and move its other columns into metadata."""
    pair = {k: v for k, v in obj.items() if k in PAIR_FIELDS and k != "metadata"} | pair
    extras = {k: v for k, v in obj.items()
              if k not in PAIR_FIELDS and k not in dropped and v is not None}
    metadata = obj.get("metadata")
    if metadata is None:
        metadata = {}
    if isinstance(metadata, dict):
        metadata = {**metadata, **extras}
    pair["metadata"] = metadata  # anything but an object is reported by the row check
    if pair.get("source") is None:
        pair["source"] = "offpolicy"
    return pair
