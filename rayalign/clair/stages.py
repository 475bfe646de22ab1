"""The row functions of the CLAIR stage: what each reviser and judge does to one row.

Rows arrive with the target's answer (`answer`, `answer_tokens`, `answer_truncated`,
`answer_error`) and leave with an `outcome`: "pair" with `chosen` and `rejected`, a reject
reason from `outcomes.REASONS` with `detail` (and the reviser's `raw` text), or "deferred".
The functions are plain, so tests call them without a cluster; the pipeline wraps them in Ray
Data stages and actors.
"""

from __future__ import annotations

import asyncio
import json
import threading

from rayalign.clair import revision, verifier
from rayalign.clair.endpoint import Endpoint, RequestFailed
from rayalign.clair.outcomes import DEFERRED
from rayalign.config import ReviserConfig, SamplingConfig
from rayalign.records import prompt_messages, question_text

# A placeholder request for rows that already have an outcome: engines answer one row per
# request, and sending one token is cheaper than splitting the stream.
_SKIP = {"messages": [{"role": "user", "content": "."}], "temperature": 0.0, "max_tokens": 1, "seed": 0,
         "schema": None}


def prompt_of(row: dict):
    return json.loads(row["prompt_json"])


def target_request(sampling: SamplingConfig):
    def request(row: dict) -> dict:
        return {"messages": prompt_messages({"prompt": prompt_of(row)}), "temperature": sampling.temperature,
                "top_p": sampling.top_p, "max_tokens": sampling.max_tokens, "seed": row["seed"], "schema": None}
    return request


def answer_outcome(row: dict) -> dict:
    """Rejects rows whose target answer failed or was cut off; others go on with outcome ''."""
    # Every row carries every outcome column, so Ray Data blocks keep one schema.
    row = {**row, "answer": row.pop("answer_text"), "outcome": "", "detail": "", "raw": "", "chosen": "",
           "rejected": ""}
    if row["answer_error"]:
        return {**row, "outcome": "generation_failed", "detail": row["answer_error"][:500]}
    if row["answer_truncated"]:
        return {**row, "outcome": "answer_too_long", "detail": f"the answer reached {row['answer_tokens']} tokens"}
    return row


def finish(row: dict, chosen: str, rejected: str, raw: str = "") -> dict:
    """The pair, or the reason there is none (empty or identical revision)."""
    if not chosen.strip():
        return {**row, "outcome": "empty_revision", "detail": "the revision is empty", "raw": raw}
    if chosen.strip() == rejected.strip():
        return {**row, "outcome": "identical", "detail": "the revision equals the original answer", "raw": raw}
    return {**row, "outcome": "pair", "chosen": chosen, "rejected": rejected, "detail": "", "raw": raw}


# ---- verifier --------------------------------------------------------------------------------

def question_of(row: dict) -> str:
    """The text of the prompt's last user message: what the verifier reads the answer against."""
    return question_text({"prompt": prompt_of(row)})


def verifier_revise(row: dict, pattern: str | None) -> dict:
    if row["outcome"]:
        return row
    if not row["reference"]:
        return {**row, "outcome": "no_reference", "detail": "the verifier needs a reference answer"}
    question = question_of(row)
    span = verifier.answer_span(row["answer"], row["reference"], pattern, question)
    if span is None:
        where = "matched answer_pattern" if pattern else "found in the response"
        return {**row, "outcome": "no_answer", "detail": f"no final answer {where}"}
    revised = verifier.revise(row["answer"], row["reference"], pattern, question)
    if revised == row["answer"]:
        found = row["answer"][span[0]:span[1]]
        return {**row, "outcome": "already_correct", "detail": f"the final answer {found!r} is already right"}
    return finish(row, revised, row["answer"])


def verifier_stronger(row: dict) -> dict:
    """Stronger Preferred with the verifier: the reference answer is the stronger answer."""
    if row["outcome"]:
        return row
    if not row["reference"]:
        return {**row, "outcome": "no_reference", "detail": "the verifier needs a reference answer"}
    return finish(row, row["reference"], row["answer"])


def verifier_judge(row: dict, pattern: str | None) -> dict:
    """On-policy judge with the verifier: the sample closer to the reference wins."""
    if row["outcome"]:
        return row
    if not row["reference"]:
        return {**row, "outcome": "no_reference", "detail": "the verifier needs a reference answer"}
    question = question_of(row)
    a, b = (verifier.score(x, row["reference"], pattern, question) for x in (row["answer"], row["answer_b"]))
    if a == b:
        return {**row, "outcome": "tie", "detail": f"both samples score {a:.3f}"}
    win, lose = (row["answer"], row["answer_b"]) if a > b else (row["answer_b"], row["answer"])
    return finish(row, win, lose)


# ---- model revisers and judges (vLLM through ray.data.llm, or an OpenAI-compatible API) ----

def _schema(schema: dict, reviser: ReviserConfig) -> dict | None:
    return revision.bounded(schema, reviser.structured_max_chars) if reviser.structured_output else None


def revision_request(reviser: ReviserConfig):
    def request(row: dict) -> dict:
        if row["outcome"]:
            return _SKIP
        text = revision.revision_request(prompt_of(row), row["answer"], reviser.revision_template,
                                         reviser.structured_output)
        return {"messages": [{"role": "user", "content": text}], "temperature": reviser.temperature,
                "max_tokens": reviser.max_tokens, "seed": row["seed"],
                "schema": _schema(revision.REVISION_SCHEMA, reviser)}
    return request


def stronger_request(reviser: ReviserConfig):
    def request(row: dict) -> dict:
        if row["outcome"]:
            return _SKIP
        return {"messages": prompt_messages({"prompt": prompt_of(row)}), "temperature": reviser.temperature,
                "max_tokens": reviser.max_tokens, "seed": row["seed"], "schema": None}
    return request


def judge_request(reviser: ReviserConfig):
    """Rows carry `order` 0 (answer as A) or 1 (answer_b as A): each pair is judged both ways."""
    def request(row: dict) -> dict:
        if row["outcome"]:
            return _SKIP
        a, b = (row["answer"], row["answer_b"]) if row["order"] == 0 else (row["answer_b"], row["answer"])
        text = revision.judge_request(prompt_of(row), a, b, reviser.judge_template, reviser.structured_output)
        return {"messages": [{"role": "user", "content": text}], "temperature": 0.0,
                "max_tokens": reviser.max_tokens, "seed": row["seed"],
                "schema": _schema(revision.VERDICT_SCHEMA, reviser)}
    return request


def reply_outcome(row: dict, prefix: str = "reply") -> dict | None:
    """The reject for a failed or cut-off reviser reply, or None when the reply is usable."""
    if row[f"{prefix}_error"]:
        return {**row, "outcome": "request_failed", "detail": row[f"{prefix}_error"][:500]}
    if row[f"{prefix}_truncated"]:
        return {**row, "outcome": "revision_too_long", "raw": row[f"{prefix}_text"],
                "detail": f"the reviser's output reached {row[f'{prefix}_tokens']} tokens"}
    return None


def revision_outcome(row: dict, structured: bool) -> dict:
    if row["outcome"]:
        return row
    failed = reply_outcome(row)
    if failed:
        return failed
    try:
        revised = revision.parse_revision(row["reply_text"], structured)
    except revision.Unparsable as exc:
        return {**row, "outcome": "unparsable", "detail": str(exc), "raw": row["reply_text"]}
    return finish(row, revised, row["answer"], raw=row["reply_text"])


def stronger_outcome(row: dict) -> dict:
    if row["outcome"]:
        return row
    return reply_outcome(row) or finish(row, row["reply_text"].strip(), row["answer"], raw=row["reply_text"])


def verdict_of(row: dict, structured: bool) -> str | dict:
    """'A', 'B' or 'tie' for one judged order, or the reject row."""
    failed = reply_outcome(row)
    if failed:
        return failed
    try:
        return revision.parse_verdict(row["reply_text"], structured)
    except revision.Unparsable as exc:
        return {**row, "outcome": "unparsable", "detail": f"judge: {exc}", "raw": row["reply_text"]}


def judge_outcome(first: dict, second: dict, structured: bool) -> dict:
    """Combine the two orders of one pair (first: answer as A; second: answer_b as A)."""
    if first["outcome"]:
        return first
    verdicts = [verdict_of(row, structured) for row in (first, second)]
    for v in verdicts:
        if isinstance(v, dict):
            return v
    combined = revision.swap_consistent(*verdicts)
    if combined == "tie":
        return {**first, "outcome": "tie", "detail": f"verdicts {verdicts[0]} then {verdicts[1]} (swapped)",
                "raw": first["reply_text"]}
    win, lose = (first["answer"], first["answer_b"]) if combined == "A" else (first["answer_b"], first["answer"])
    return finish(first, win, lose, raw=first["reply_text"])


class OpenAIStage:
    """Ray Data actor: sends each row's request to an OpenAI-compatible endpoint concurrently.

    `request(row)` builds the request (as for vLLM); the reply lands in the same `reply_*`
    columns the vLLM stage writes, so the same outcome functions apply. A shared token budget
    (a Ray actor) can refuse a request, which defers its row to the next run.
    """

    def __init__(self, reviser: ReviserConfig, request, budget=None):
        self.reviser, self.request, self.budget = reviser, request, budget
        # Ray Data calls the actor from worker threads; the client, its connection pool and the
        # concurrency limits live on one event loop in a thread of their own.
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.endpoint = self._run(self._endpoint())

    async def _endpoint(self) -> Endpoint:
        r = self.reviser
        return Endpoint(r.base_url, r.model, r.api_key_env, max_concurrency=r.max_concurrency,
                        requests_per_second=r.requests_per_second, max_retries=r.max_retries, timeout_s=r.timeout_s)

    def _run(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    async def _all(self, rows: list[dict]) -> list[dict]:
        return await asyncio.gather(*(self.one(row) for row in rows))

    def __call__(self, batch: dict) -> dict:
        columns = {k: (v.tolist() if hasattr(v, "tolist") else list(v)) for k, v in batch.items()}
        rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
        done = self._run(self._all(rows))
        return {key: [row[key] for row in done] for key in done[0]} if done else batch

    async def one(self, row: dict) -> dict:
        req = self.request(row)
        if req is _SKIP:
            return {**row, "reply_text": "", "reply_tokens": 0, "reply_truncated": False, "reply_error": "",
                    "reviser_tokens": 0}
        estimate = estimate_tokens(req)
        if self.budget is not None and not await self.budget.reserve.remote(estimate):
            return {**row, "outcome": DEFERRED, "detail": "token budget reached", "reply_text": "",
                    "reply_tokens": 0, "reply_truncated": False, "reply_error": "", "reviser_tokens": 0}
        try:
            reply = await self.endpoint.chat(req["messages"], temperature=req["temperature"],
                                             max_tokens=req["max_tokens"], seed=req["seed"], schema=req["schema"])
        except RequestFailed as exc:
            if self.budget is not None:
                await self.budget.settle.remote(estimate, 0)
            return {**row, "reply_text": "", "reply_tokens": 0, "reply_truncated": False, "reply_error": str(exc),
                    "reviser_tokens": 0}
        used = reply.prompt_tokens + reply.completion_tokens
        if self.budget is not None:
            await self.budget.settle.remote(estimate, used)
        return {**row, "reply_text": reply.text, "reply_tokens": reply.completion_tokens,
                "reply_truncated": reply.finish_reason == "length", "reply_error": "", "reviser_tokens": used}


def estimate_tokens(req: dict) -> int:
    """An upper-bound estimate for budgeting: ~4 characters a token for the input, plus max_tokens."""
    chars = sum(len(m["content"]) for m in req["messages"])
    return chars // 4 + 1 + req["max_tokens"]


class TokenBudget:
    """A Ray actor shared by all reviser actors: reserves an estimate before each request and
    settles it with the tokens actually used, so the cap is never exceeded by estimates."""

    def __init__(self, limit: int):
        self.limit, self.used, self.reserved = limit, 0, 0

    def reserve(self, tokens: int) -> bool:
        if self.used + self.reserved + tokens > self.limit:
            return False
        self.reserved += tokens
        return True

    def settle(self, reserved: int, used: int) -> None:
        self.reserved -= reserved
        self.used += used

    def spent(self) -> int:
        return self.used
