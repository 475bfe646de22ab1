"""Evaluating served models through their OpenAI-compatible endpoint with the `openai` client.

Kinds (`eval.kind`):
- `exact`: a rayalign prompt file (id, prompt, reference); a response is correct when its final
  answer says the reference, by `rayalign.clair.verifier.is_correct`: a short response is the
  answer itself (compared after NFKC, case folding, whitespace collapsing and dropping a
  trailing period); in prose ("The capital of Kenya is Nairobi.") the answer span is found, and
  the words and numbers of the prompt's last user message are never taken for it;
  `eval.answer_pattern` picks the final answer out of a longer response instead. Rows whose
  `metadata.family` is a string are also scored per family (`by_family`, present when any row
  has one).
- `choice`: benchmark files in JSONL, Parquet, a `datasets` directory, or a JSON list or
  id-keyed object (MixEval's own files). Each item is read by one of two adapters:
    MMLU style    {question, choices: [...], answer: index or letter, id?}
    MixEval style {prompt or problem, context?, options?: [...], target: [...], id?}
  With options, targets are option indices, letters or option texts; the response is scored
  by the letter it chooses ("Answer: B", "(B)", "B. ...") or, failing that, by being exactly
  one option's text. Without options (free-form), a response is correct when it equals any
  target after normalisation or, with `eval.judge_model` set, when the judge grades it
  correct, as MixEval's model parser does.
- `judge`: pairwise. Both `eval.models` answer each prompt; the judge compares the answers
  twice with the order swapped, and a model wins only when it wins in both orders
  (`swap_consistent`); otherwise it is a tie. Unparsable verdicts and failed requests are
  counted apart. Win rate = (wins + ties / 2) / (wins + losses + ties). When rows carry
  references, both answers are also scored as in `exact` (`exact`, per example `correct`), and
  the judge is checked against that score (`agreement`): on the decisive prompts, where exactly
  one answer is right, it agrees when its outcome picks the right one. A judge whose win rates
  are worth reading agrees well above half the time.

Transient endpoint errors are retried with backoff (`clair.endpoint.Endpoint`); an example that
still fails is recorded as failed: neither right nor wrong, and never dropped. Accuracy, win
rate and agreement come with a Wilson 95% interval. Under `eval.output` (default
<run_dir>/eval): results.md, results.png, examples.jsonl (every example with its response, for
re-scoring) and, written last, manifest.json (the results, rayalign.stage.finish).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import re
import time
from pathlib import Path

from rayalign import records
from rayalign.clair.endpoint import Endpoint, RequestFailed, api_key
from rayalign.clair.revision import (VERDICT_SCHEMA, Unparsable, bounded, judge_request, parse_verdict,
                                     swap_consistent)
from rayalign.clair.verifier import is_correct, normalize
from rayalign.config import ConfigError, RunConfig
from rayalign.records import DataError
from rayalign.stage import finish, fingerprint

Z95 = 1.959963984540054
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
CHOICE_NOTE = "Answer with the letter of the correct option."
GRADE_TEMPLATE = """\
Decide whether a response answers a question correctly, given the gold answers.

# Question
{question}

# Gold answers
{targets}

# Response
{response}

Give your verdict between <verdict> and </verdict>: correct or incorrect.
"""
GRADE_SCHEMA = {"type": "object",
                "properties": {"reasoning": {"type": "string"},
                               "verdict": {"type": "string", "enum": ["correct", "incorrect"]}},
                "required": ["reasoning", "verdict"], "additionalProperties": False}


class EvalError(RuntimeError):
    """The endpoint cannot be used at all (down, wrong model name); the message says which."""


def wilson(k: float, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval for k successes out of n (None when n is 0)."""
    if n == 0:
        return None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (0.0 if k == 0 else max(0.0, centre - half), 1.0 if k == n else min(1.0, centre + half))


def accuracy(examples: list[dict]) -> dict:
    """Failed examples are counted apart: the accuracy is over the scored ones."""
    failed = sum(1 for e in examples if e["failed"])
    scored = len(examples) - failed
    correct = sum(1 for e in examples if not e["failed"] and e["correct"])
    return {"n": len(examples), "scored": scored, "correct": correct, "failed": failed,
            "accuracy": correct / scored if scored else None, "ci95": wilson(correct, scored)}


def tally_judgments(examples: list[dict]) -> dict:
    counts = {k: sum(1 for e in examples if e["outcome"] == k)
              for k in ("win", "loss", "tie", "unparsable", "failed")}
    decided = counts["win"] + counts["loss"] + counts["tie"]
    score = counts["win"] + counts["tie"] / 2
    return {"n": len(examples), "wins": counts["win"], "losses": counts["loss"], "ties": counts["tie"],
            "unparsable": counts["unparsable"], "failed": counts["failed"],
            "win_rate": score / decided if decided else None, "ci95": wilson(score, decided)}


def family_accuracy(examples: list[dict]) -> dict:
    """accuracy() per family, over the examples that have one (their "family" key)."""
    families: dict[str, list[dict]] = {}
    for e in examples:
        if e.get("family") is not None:
            families.setdefault(e["family"], []).append(e)
    return {name: accuracy(group) for name, group in sorted(families.items())}


def agreement(examples: list[dict]) -> dict:
    """How often the judge's outcome for the first model ("outcome") picks the answer that exact
    match ("correct": one bool or None per model) says is right, on the decisive examples: both
    answers scored, exactly one right. Its ties, unparsable verdicts and failures are counted apart."""
    decisive = [e for e in examples if list(e["correct"]) in ([True, False], [False, True])]
    counts = dict.fromkeys(("agree", "disagree", "tie", "unparsable", "failed"), 0)
    for e in decisive:
        if e["outcome"] in ("win", "loss"):
            picked = 0 if e["outcome"] == "win" else 1
            counts["agree" if e["correct"][picked] else "disagree"] += 1
        else:
            counts[e["outcome"]] += 1
    decided = counts["agree"] + counts["disagree"]
    return {"decisive": len(decisive), **counts, "rate": counts["agree"] / decided if decided else None,
            "ci95": wilson(counts["agree"], decided)}


# ---- choice data --------------------------------------------------------------------------------

def choice_item(obj: dict, fallback_id: str) -> dict:
    """One MMLU- or MixEval-style item as {id, question, options, answers, targets}; raises
    records.BadRow with the reason."""
    question = next((obj[k] for k in ("question", "prompt", "problem") if isinstance(obj.get(k), str)), None)
    if not question:
        raise records.BadRow("needs a text field question, prompt or problem")
    if obj.get("context"):
        question = f"{obj['context']}\n\n{question}"
    options = obj.get("choices") or obj.get("options") or None
    raw = obj["answer"] if "answer" in obj else obj.get("target")
    targets = raw if isinstance(raw, list) else [] if raw is None else [raw]
    if not targets:
        raise records.BadRow("needs answer (MMLU style) or target (MixEval style)")
    item = {"id": str(obj.get("id", fallback_id)), "question": question, "options": None, "answers": None,
            "targets": [str(t) for t in targets]}
    if options is None:
        return item
    if not isinstance(options, list) or not all(isinstance(o, str) for o in options) or len(options) > 26:
        raise records.BadRow("choices/options must be a list of at most 26 strings")
    item["options"] = options
    item["answers"] = sorted({_option_index(t, options) for t in targets})
    return item


def _option_index(target, options: list[str]) -> int:
    if isinstance(target, int) and not isinstance(target, bool) and 0 <= target < len(options):
        return target
    if isinstance(target, str) and len(target.strip()) == 1 and target.strip().upper() in LETTERS[:len(options)]:
        return LETTERS.index(target.strip().upper())
    matches = [i for i, o in enumerate(options) if isinstance(target, str) and normalize(o) == normalize(target)]
    if len(matches) == 1:
        return matches[0]
    raise records.BadRow(f"answer {target!r} is not an option index, letter or option text")


def load_choice(path: str) -> list[dict]:
    found = Path(path)
    if found.suffix == ".json":
        try:
            data = json.loads(found.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise DataError(f"{path}: not a readable JSON file ({exc})") from None
        pairs = data.items() if isinstance(data, dict) else enumerate(data if isinstance(data, list) else [])
        rows = [(f"{path}:item {k}", str(k), v) for k, v in pairs]
    else:
        rows = [(r.location, str(r.line), r.value if r.error is None else r.error) for r in records.read_records(path)]
    items, problems = [], []
    for where, fallback_id, value in rows:
        try:
            if not isinstance(value, dict):
                raise records.BadRow(value if isinstance(value, str) else "not a JSON object")
            items.append(choice_item(value, fallback_id))
        except records.BadRow as exc:
            problems.append(f"{where}: {exc}")
    if problems:
        raise DataError("\n".join([f"{len(problems)} bad item(s) in {path}", *problems]))
    if not items:
        raise DataError(f"{path} holds no items")
    return items


def choice_prompt(item: dict) -> str:
    if item["options"] is None:
        return item["question"]
    lines = [f"{LETTERS[i]}. {o}" for i, o in enumerate(item["options"])]
    return "\n".join([item["question"], "", *lines, CHOICE_NOTE])


def parse_choice(text: str, options: list[str]) -> int | None:
    """The chosen option's index: an explicit "answer: X", a leading letter, or the text of
    exactly one option; None when the response chooses nothing."""
    letters = LETTERS[:len(options)]
    explicit = re.findall(r"(?i:answer)(?:\s+is)?\s*[:\-]?\s*\(?([A-Z])\)?(?![A-Za-z])", text)
    leading = re.match(r"\s*\(?([A-Z])\)?(?:[.):]|\s|$)", text)
    for letter in (explicit[-1] if explicit else None, leading.group(1) if leading else None):
        if letter is not None and letter in letters:
            return letters.index(letter)
    matches = [i for i, o in enumerate(options) if normalize(o) == normalize(text)]
    return matches[0] if len(matches) == 1 else None


def parse_grade(text: str, structured: bool) -> bool | None:
    """True for correct, False for incorrect, None when the grade holds neither."""
    if structured:
        try:
            verdict = json.loads(text).get("verdict")
        except (json.JSONDecodeError, AttributeError):
            verdict = None
    else:
        found = re.findall(r"<verdict>\s*(.*?)\s*</verdict>", text, flags=re.DOTALL | re.IGNORECASE)
        verdict = found[-1].strip().strip(".").lower() if found else None
    return {"correct": True, "incorrect": False}.get(verdict)


def judge_outcome(first: str, second: str, structured: bool) -> str:
    """win / loss / tie for the first model (answer A in `first`, B in `second`), or unparsable."""
    try:
        combined = swap_consistent(parse_verdict(first, structured), parse_verdict(second, structured))
    except Unparsable:
        return "unparsable"
    return {"A": "win", "B": "loss", "tie": "tie"}[combined]


# ---- talking to the endpoint ---------------------------------------------------------------------

class Asker:
    """Chat requests to one endpoint, `eval.concurrency` at a time, with a progress bar."""

    def __init__(self, config: RunConfig, base_url: str, key_env: str | None):
        self.ev, self.base_url, self.key_env = config.eval, base_url, key_env
        self.retries = 0

    def models(self) -> list[str]:
        from openai import OpenAI, OpenAIError

        try:
            client = OpenAI(base_url=self.base_url, api_key=api_key(self.key_env), max_retries=self.ev.max_retries,
                            timeout=self.ev.timeout_s)
            return [m.id for m in client.models.list().data]
        except (OpenAIError, RequestFailed) as exc:
            raise EvalError(f"cannot list the models at {self.base_url} ({exc.__class__.__name__}: "
                            f"{str(exc)[:200]}); is the endpoint (`rayalign serve`) running?") from None

    def ask(self, model: str, requests: list[dict], desc: str) -> list[dict]:
        """Per request, in order: {response, finish_reason, failed, error}."""
        return asyncio.run(self._ask(model, requests, desc))

    async def _ask(self, model: str, requests: list[dict], desc: str) -> list[dict]:
        from tqdm import tqdm

        endpoint = Endpoint(self.base_url, model, self.key_env, max_concurrency=self.ev.concurrency,
                            max_retries=self.ev.max_retries, timeout_s=self.ev.timeout_s)
        bar = tqdm(total=len(requests), desc=desc, unit="req")

        async def one(request: dict) -> dict:
            try:
                reply = await endpoint.chat(**request)
                return {"response": reply.text, "finish_reason": reply.finish_reason, "failed": False, "error": None}
            except RequestFailed as exc:
                return {"response": None, "finish_reason": None, "failed": True, "error": str(exc)}
            finally:
                bar.update()

        try:
            return await asyncio.gather(*(one(r) for r in requests))
        finally:
            bar.close()
            self.retries += endpoint.retries
            await endpoint.close()


def _request(ev, messages: list[dict]) -> dict:
    return {"messages": messages, "temperature": ev.temperature, "max_tokens": ev.max_tokens}


def score_exact(row: dict, answer: dict, pattern: str | None) -> bool | None:
    """Whether the answer says the row's reference; None when it failed or there is no reference.
    The question is the last user message: a system message's words may well be the answer."""
    if answer["failed"] or "reference" not in row:
        return None
    return is_correct(answer["response"], row["reference"], pattern, question=records.question_text(row))


def _family(row: dict) -> str | None:
    family = row["metadata"].get("family")
    return family if isinstance(family, str) else None


def _judge_request(ev, text: str, schema: dict) -> dict:
    return {"messages": [{"role": "user", "content": text}], "temperature": 0.0, "max_tokens": ev.judge_max_tokens,
            "schema": bounded(schema, ev.judge_max_chars) if ev.judge_structured else None}


# ---- the three kinds -------------------------------------------------------------------------------

def eval_exact(config: RunConfig, asker: Asker, judge: Asker | None, models: list[str]):
    ev = config.eval
    rows = records.load_prompts(ev.data)[:ev.limit]
    missing = [r["id"] for r in rows if "reference" not in r]
    if missing:
        raise DataError(f"{ev.data}: kind 'exact' needs a reference answer in every row; missing in {missing[:5]}")
    examples, results = [], {}
    for model in models:
        answers = asker.ask(model, [_request(ev, records.prompt_messages(r)) for r in rows], f"eval {model}")
        mine = [{"model": model, "id": r["id"], "prompt": r["prompt"], "reference": r["reference"],
                 "family": _family(r), **a, "correct": score_exact(r, a, ev.answer_pattern)}
                for r, a in zip(rows, answers)]
        examples += mine
        families = family_accuracy(mine)
        results[model] = {**accuracy(mine), "by_family": families} if families else accuracy(mine)
    return results, examples


def eval_choice(config: RunConfig, asker: Asker, judge: Asker | None, models: list[str]):
    ev = config.eval
    items = load_choice(ev.data)[:ev.limit]
    examples, results = [], {}
    for model in models:
        requests = [_request(ev, [{"role": "user", "content": choice_prompt(i)}]) for i in items]
        mine = [{"model": model, **i, **a} for i, a in zip(items, asker.ask(model, requests, f"eval {model}"))]
        for e in mine:
            if e["failed"]:
                e["correct"] = None
            elif e["options"] is not None:
                e["choice"] = parse_choice(e["response"], e["options"])
                e["correct"] = e["choice"] in e["answers"]
            elif judge is None:
                e["correct"] = normalize(e["response"]) in {normalize(t) for t in e["targets"]}
        graded = [e for e in mine if "correct" not in e]
        texts = [GRADE_TEMPLATE.format(question=e["question"], targets="\n".join(e["targets"]), response=e["response"])
                 for e in graded]
        grades = judge.ask(ev.judge_model, [_judge_request(ev, t, GRADE_SCHEMA) for t in texts],
                           f"grade {model}") if graded else []
        for e, grade in zip(graded, grades):
            e["grade"] = grade["response"]
            e["correct"] = None if grade["failed"] else parse_grade(grade["response"], ev.judge_structured)
            if e["correct"] is None:  # an answer the judge could not grade is not scored: failed, not wrong
                e["failed"], e["error"] = True, grade["error"] or "the judge's grade is unusable"
        examples += mine
        results[model] = {**accuracy(mine), "unparsed": sum(1 for e in mine if e.get("choice", 0) is None)}
    return results, examples


def eval_judge(config: RunConfig, asker: Asker, judge: Asker | None, models: list[str]):
    ev = config.eval
    first, second = models
    rows = records.load_prompts(ev.data)[:ev.limit]
    answers = [asker.ask(m, [_request(ev, records.prompt_messages(r)) for r in rows], f"answer {m}") for m in models]
    examples = [{"id": r["id"], "prompt": r["prompt"], "reference": r.get("reference"), "models": [first, second],
                 "answers": [a, b], "correct": [score_exact(r, x, ev.answer_pattern) for x in (a, b)],
                 "judgments": [], "outcome": "failed" if a["failed"] or b["failed"] else None,
                 "error": a["error"] or b["error"]} for r, a, b in zip(rows, *answers)]
    pending = [e for e in examples if e["outcome"] is None]
    requests = []
    for e in pending:  # each pair in both orders: the first model's answer as A, then as B
        a, b = (answer["response"] for answer in e["answers"])
        requests += [_judge_request(ev, judge_request(e["prompt"], x, y, structured=ev.judge_structured),
                                    VERDICT_SCHEMA) for x, y in ((a, b), (b, a))]
    verdicts = judge.ask(ev.judge_model, requests, f"judge {first} vs {second}")
    for e, pair in zip(pending, zip(verdicts[0::2], verdicts[1::2])):
        e["judgments"] = [v["response"] for v in pair]
        failed = [v["error"] for v in pair if v["failed"]]
        e["outcome"] = "failed" if failed else judge_outcome(*e["judgments"], ev.judge_structured)
        e["error"] = failed[0] if failed else None
    result = tally_judgments(examples)
    referenced = [e for e in examples if e["reference"] is not None]
    if referenced:
        result["agreement"] = agreement(referenced)
        result["exact"] = {m: accuracy([{"failed": e["answers"][i]["failed"], "correct": e["correct"][i]}
                                        for e in referenced]) for i, m in enumerate(models)}
    return {f"{first} vs {second}": result}, examples


KINDS = {"exact": eval_exact, "choice": eval_choice, "judge": eval_judge}


# ---- the run ----------------------------------------------------------------------------------

def output_dir(config: RunConfig) -> Path:
    return Path(config.eval.output or Path(config.run_dir) / "eval")


def check_data(config: RunConfig) -> None:
    """eval.data read as its kind reads it, so a bad row fails before anything is served (a
    pipeline checks this before its first stage)."""
    ev = config.eval
    if ev.data is None:
        raise ConfigError(f"eval.data: is required for kind {ev.kind!r} (a prompt or benchmark file)")
    if not Path(ev.data).exists():
        raise ConfigError(f"eval.data: {ev.data} does not exist")
    if ev.kind == "choice":
        load_choice(ev.data)
    else:
        records.load_prompts(ev.data)


def run_eval(config: RunConfig, key: str | None = None) -> dict:
    """Evaluate the served models; writes results and examples under eval.output and returns
    the results, which `manifest.json` keeps under `key` (by default a fingerprint of the eval
    settings; `rayalign pipeline` adds the served models' content)."""
    ev = config.eval
    if ev.data is None:
        raise ConfigError(f"eval.data: is required for kind {ev.kind!r} (a prompt or benchmark file)")
    started = time.perf_counter()
    key_env = ev.api_key_env or config.serve.api_key_env
    asker = Asker(config, ev.base_url, key_env)
    served = asker.models()
    models = ev.models or served
    unknown = [m for m in models if m not in served]
    if unknown:
        raise EvalError(f"eval.models: {unknown} not served at {ev.base_url} (it serves {served})")
    judge = None
    if ev.judge_model is not None:
        judge = Asker(config, ev.judge_base_url or ev.base_url,
                      ev.judge_api_key_env or (key_env if ev.judge_base_url is None else None))
    results, examples = KINDS[ev.kind](config, asker, judge, models)
    summary = {"kind": ev.kind, "data": ev.data, "base_url": ev.base_url, "models": models,
               "judge_model": ev.judge_model, "results": results,
               "retries": asker.retries + (judge.retries if judge else 0),
               "seconds": round(time.perf_counter() - started, 1)}
    out = output_dir(config)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "examples.jsonl", "w", encoding="utf-8") as f:
        for e in examples:
            f.write(json.dumps(e, ensure_ascii=False) + "\n")
    (out / "results.md").write_text(markdown(summary), encoding="utf-8")
    plot(summary, out / "results.png")
    finish(out, "eval", key or fingerprint(dataclasses.asdict(ev)), summary)  # last
    return summary


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _ci(ci) -> str:
    return "n/a" if ci is None else f"{_pct(ci[0])} to {_pct(ci[1])}"


def markdown(summary: dict) -> str:
    head = f"# Evaluation ({summary['kind']}) of {summary['data']}\n\n"
    if summary["kind"] == "judge":
        rows = ["| comparison | win rate | 95% CI | wins | losses | ties | unparsable | failed |",
                "|---|---|---|---|---|---|---|---|"]
        rows += [f"| {name} | {_pct(r['win_rate'])} | {_ci(r['ci95'])} | {r['wins']} | {r['losses']} | "
                 f"{r['ties']} | {r['unparsable']} | {r['failed']} |" for name, r in summary["results"].items()]
        note = f"\nJudge: {summary['judge_model']}; each pair judged in both orders.\n"
        note += "".join(_agreement_lines(name, r) for name, r in summary["results"].items() if "agreement" in r)
    else:
        rows = ["| model | accuracy | 95% CI | correct / scored | failed |", "|---|---|---|---|---|"]
        rows += [f"| {name} | {_pct(r['accuracy'])} | {_ci(r['ci95'])} | {r['correct']} / {r['scored']} | "
                 f"{r['failed']} |" for name, r in summary["results"].items()]
        note = "\nFailed examples (the endpoint gave no answer after retries) are not scored.\n"
        note += _family_table(summary["results"])
    return head + "\n".join(rows) + "\n" + note


def family_table(results: dict) -> list[str]:
    """Families as rows, models as columns: accuracy (correct / scored); no lines without families."""
    families = sorted({f for r in results.values() for f in r.get("by_family", {})})
    if not families:
        return []
    lines = ["| family | " + " | ".join(results) + " |", "|---" * (len(results) + 1) + "|"]
    for family in families:
        cells = [results[m].get("by_family", {}).get(family) for m in results]
        text = ["n/a" if c is None else f"{_pct(c['accuracy'])} ({c['correct']} / {c['scored']})" for c in cells]
        lines.append(f"| {family} | {' | '.join(text)} |")
    return lines


def _family_table(results: dict) -> str:
    lines = family_table(results)
    return "\n".join(["", "## By family", "", *lines]) + "\n" if lines else ""


def _agreement_lines(name: str, r: dict) -> str:
    a = r["agreement"]
    decided = a["agree"] + a["disagree"]
    exact = ", ".join(f"{m} {_pct(x['accuracy'])} ({x['correct']} / {x['scored']})" for m, x in r["exact"].items())
    return (f"\n{name}: judge agrees with exact match on {a['agree']} of {a['decisive']} decisive prompts "
            f"(one answer right, one wrong): {_pct(a['rate'])} of the {decided} it decided, 95% CI {_ci(a['ci95'])}; "
            f"{a['tie']} ties, {a['unparsable']} unparsable, {a['failed']} failed.\n"
            f"Exact match on the same prompts: {exact}.\n")


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = list(summary["results"])
    if summary["kind"] == "judge":
        r, left = summary["results"][names[0]], 0
        for part, colour in zip(("wins", "ties", "losses", "unparsable", "failed"),
                                ("tab:green", "tab:gray", "tab:red", "tab:orange", "black")):
            ax.barh([names[0]], [r[part]], left=left, color=colour, label=part)
            left += r[part]
        ax.set_xlabel("examples")
        ax.legend(fontsize="small", ncol=5, loc="upper center", bbox_to_anchor=(0.5, -0.25))
    else:
        values = [summary["results"][n]["accuracy"] or 0.0 for n in names]
        cis = [summary["results"][n]["ci95"] or (v, v) for n, v in zip(names, values)]
        # Clamped: at 0% or 100% the interval's end equals the value up to rounding.
        errors = [[max(0.0, v - lo) for v, (lo, _) in zip(values, cis)],
                  [max(0.0, hi - v) for v, (_, hi) in zip(values, cis)]]
        ax.bar(names, values, yerr=errors, capsize=6, color="tab:blue")
        ax.set_ylim(0, 1)
        ax.set_ylabel("accuracy (95% CI)")
    ax.set_title(f"{summary['kind']}: {Path(str(summary['data'])).name}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
