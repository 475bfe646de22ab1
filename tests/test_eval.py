"""Evaluation: scoring rules and counting by value, then `run_eval` end to end through the
shared Ray Serve deployment (tests/serve_fixtures.py), with faults injected by a proxy."""

import dataclasses
import json
import random
import re

import openai
import pytest
import yaml

from rayalign import records
from rayalign.clair import verifier
from rayalign.config import load_config
from rayalign.evaluate import (accuracy, agreement, choice_item, family_accuracy, judge_outcome, load_choice,
                               markdown, output_dir, parse_choice, parse_grade, run_eval, score_exact,
                               tally_judgments, wilson)
from rayalign.questions import FAMILIES, question_prompts
from rayalign.records import BadRow, DataError
from rayalign.stage import fingerprint
from rayalign.tasks import addition_prompts
from tests.fault_proxy import FaultProxy

integration = pytest.mark.integration
# The shared deployment (`served`), loaded as a plugin so that it starts once per session.
pytest_plugins = ["tests.serve_fixtures"]


# ---- counting and parsing, by value --------------------------------------------------------------

def test_wilson_interval_by_hand():
    # 8 of 10, z = 1.96: centre (0.8 + 0.19208) / 1.38415 = 0.71675, half 0.22656.
    lo, hi = wilson(8, 10)
    assert lo == pytest.approx(0.49016, abs=1e-4) and hi == pytest.approx(0.94331, abs=1e-4)
    assert wilson(0, 5)[0] == 0.0 and wilson(5, 5)[1] == 1.0
    assert wilson(0, 0) is None


def test_accuracy_counts_failed_apart():
    examples = ([{"failed": False, "correct": True}] * 3 + [{"failed": False, "correct": False}]
                + [{"failed": True, "correct": None}] * 2)
    result = accuracy(examples)
    assert {k: result[k] for k in ("n", "scored", "correct", "failed", "accuracy")} == {
        "n": 6, "scored": 4, "correct": 3, "failed": 2, "accuracy": 0.75}
    assert result["ci95"] == wilson(3, 4)


def test_judge_outcomes_in_both_orders():
    v = "<verdict>{}</verdict>".format
    assert judge_outcome(v("A"), v("B"), False) == "win"     # first model wins in both orders
    assert judge_outcome(v("B"), v("A"), False) == "loss"
    assert judge_outcome(v("A"), v("A"), False) == "tie"     # position bias cancels
    assert judge_outcome(v("tie"), v("tie"), False) == "tie"
    assert judge_outcome(v("A"), "no verdict here", False) == "unparsable"
    assert judge_outcome(v("maybe"), v("A"), False) == "unparsable"
    assert judge_outcome('{"reasoning": "x", "verdict": "B"}', '{"reasoning": "y", "verdict": "A"}', True) == "loss"
    assert judge_outcome('{"reasoning": "x", "verd', '{"verdict": "A"}', True) == "unparsable"


def test_tally_counts_wins_ties_unparsable_and_failed_apart():
    outcomes = ["win"] * 5 + ["loss"] * 2 + ["tie"] * 2 + ["unparsable"] * 3 + ["failed"]
    result = tally_judgments([{"outcome": o} for o in outcomes])
    assert {k: result[k] for k in ("n", "wins", "losses", "ties", "unparsable", "failed")} == {
        "n": 13, "wins": 5, "losses": 2, "ties": 2, "unparsable": 3, "failed": 1}
    assert result["win_rate"] == pytest.approx((5 + 1) / 9)
    assert result["ci95"] == wilson(6, 9)
    assert tally_judgments([{"outcome": "unparsable"}])["win_rate"] is None


def test_agreement_with_exact_match_counts_each_case():
    # (judge outcome for the first model, exact match of [first, second])
    cases = ([("win", [True, False])] * 2 + [("loss", [False, True])]   # agree: the right answer picked
             + [("loss", [True, False]), ("win", [False, True])]        # disagree: the wrong one picked
             + [("tie", [True, False]), ("tie", [False, True])]         # decisive, but not decided
             + [("unparsable", [False, True]), ("failed", [True, False])]
             + [("win", [True, True]), ("loss", [False, False])]        # both right, both wrong: not decisive
             + [("failed", [True, None]), ("tie", [None, None])])       # an answer failed, or no reference
    result = agreement([{"outcome": o, "correct": c} for o, c in cases])
    assert result == {"decisive": 9, "agree": 3, "disagree": 2, "tie": 2, "unparsable": 1, "failed": 1,
                      "rate": 3 / 5, "ci95": wilson(3, 5)}
    undecided = agreement([{"outcome": "tie", "correct": [True, False]}, {"outcome": "win", "correct": [True, True]}])
    assert (undecided["decisive"], undecided["tie"], undecided["rate"], undecided["ci95"]) == (1, 1, None, None)


def test_family_accuracy_groups_by_family_and_leaves_out_rows_without_one():
    examples = ([{"family": "capital", "failed": False, "correct": c} for c in (True, True, False)]
                + [{"family": "capital", "failed": True, "correct": None}]
                + [{"family": "sum", "failed": False, "correct": False}]
                + [{"family": None, "failed": False, "correct": True}])
    result = family_accuracy(examples)
    assert result == {
        "capital": {"n": 4, "scored": 3, "correct": 2, "failed": 1, "accuracy": 2 / 3, "ci95": wilson(2, 3)},
        "sum": {"n": 1, "scored": 1, "correct": 0, "failed": 0, "accuracy": 0.0, "ci95": wilson(0, 1)}}
    assert family_accuracy([{"family": None, "failed": False, "correct": True}]) == {}


def test_score_exact_takes_the_question_from_the_last_user_message():
    chat = {"prompt": [{"role": "system", "content": "Answer in 1 sentence, not 7 words."},
                       {"role": "user", "content": "What is 3 plus 4?"}], "reference": "7", "metadata": {}}
    answer = {"response": "3 plus 4 is 7, not 3.", "failed": False}
    # The question's 3 and 4 are not the answer; the system message's 7 still can be.
    assert score_exact(chat, answer, None) is True
    assert verifier.is_correct(answer["response"], "7") is False  # without the question: the last number, 3
    text = {"prompt": "Which city is the capital of Kenya?", "reference": "Nairobi", "metadata": {}}
    assert score_exact(text, {"response": "The capital of Kenya is Nairobi.", "failed": False}, None) is True
    assert score_exact(text, {"response": "The capital of Kenya is Mombasa.", "failed": False}, None) is False
    assert score_exact(text, {"response": "final: Nairobi", "failed": False}, r"final:\s*(.+)") is True
    assert score_exact(text, {"response": None, "failed": True}, None) is None
    assert score_exact({"prompt": "q?", "metadata": {}}, {"response": "x", "failed": False}, None) is None


def test_parse_choice():
    options = ["0 5 7 9", "0 5 8 9", "red", "blue"]
    assert parse_choice("B", options) == 1
    assert parse_choice("(C) because red is warm", options) == 2
    assert parse_choice("I think the answer is D.", options) == 3
    assert parse_choice("Answer: A", options) == 0
    assert parse_choice("0 5 8 9", options) == 1          # the text of one option
    assert parse_choice("E", options) is None             # no such option
    assert parse_choice("a bit unsure", options) is None  # lower-case words are not letters
    assert parse_choice("", options) is None


def test_parse_grade():
    assert parse_grade("looks right <verdict>correct</verdict>", False) is True
    assert parse_grade("<verdict>Incorrect.</verdict>", False) is False
    assert parse_grade('{"reasoning": "", "verdict": "correct"}', True) is True
    assert parse_grade("<verdict>perhaps</verdict>", False) is None
    assert parse_grade('{"reasoning": "', True) is None


def test_choice_adapters_mmlu_and_mixeval(tmp_path):
    mmlu = choice_item({"question": "2+2?", "choices": ["3", "4", "5"], "answer": 1}, "7")
    assert (mmlu["id"], mmlu["options"], mmlu["answers"]) == ("7", ["3", "4", "5"], [1])
    assert choice_item({"question": "q", "choices": ["x", "y"], "answer": "B"}, "1")["answers"] == [1]
    mix = choice_item({"id": "m1", "prompt": "Which?", "context": "Ctx", "options": ["a", "b", "c"],
                       "target": [2]}, "1")
    assert (mix["id"], mix["question"], mix["answers"]) == ("m1", "Ctx\n\nWhich?", [2])
    free = choice_item({"problem": "Capital of France?", "target": ["Paris", "paris, france"]}, "3")
    assert free["options"] is None and free["targets"] == ["Paris", "paris, france"]
    with pytest.raises(BadRow, match="not an option index"):
        choice_item({"question": "q", "choices": ["x", "y"], "answer": 5}, "1")
    with pytest.raises(BadRow, match="needs answer"):
        choice_item({"question": "q"}, "1")

    # MixEval's own files are JSON objects keyed by id; a bad item is reported with its place.
    (tmp_path / "mix.json").write_text(json.dumps({"0": {"prompt": "p", "target": ["t"]}, "1": {"prompt": "q"}}))
    with pytest.raises(DataError, match=r"mix.json:item 1: needs answer"):
        load_choice(str(tmp_path / "mix.json"))
    (tmp_path / "mmlu.jsonl").write_text('{"question": "q", "choices": ["x", "y"], "answer": 0}\n{bad json\n')
    with pytest.raises(DataError, match=r"mmlu.jsonl:2: malformed JSON"):
        load_choice(str(tmp_path / "mmlu.jsonl"))


def test_markdown_table_by_value():
    summary = {"kind": "exact", "data": "p.jsonl", "results": {
        "aligned": {"accuracy": 0.75, "ci95": (0.30064, 0.95440), "correct": 3, "scored": 4, "failed": 2}}}
    assert "| aligned | 75.0% | 30.1% to 95.4% | 3 / 4 | 2 |" in markdown(summary)
    assert "By family" not in markdown(summary)

    families = {"capital": {"accuracy": 0.5, "correct": 1, "scored": 2}, "sum": {"accuracy": None, "correct": 0,
                                                                                 "scored": 0}}
    summary["results"]["aligned"]["by_family"] = families
    summary["results"]["base"] = {"accuracy": 0.0, "ci95": None, "correct": 0, "scored": 4, "failed": 0,
                                  "by_family": {"capital": {"accuracy": 0.0, "correct": 0, "scored": 2}}}
    table = markdown(summary)
    assert "| family | aligned | base |\n|---|---|---|\n" in table
    assert "| capital | 50.0% (1 / 2) | 0.0% (0 / 2) |\n| sum | n/a (0 / 0) | n/a |\n" in table

    judged = {"kind": "judge", "data": "p.jsonl", "judge_model": "base", "results": {"aligned vs base": {
        "win_rate": 0.5, "ci95": None, "wins": 3, "losses": 2, "ties": 2, "unparsable": 1, "failed": 0,
        "agreement": {"decisive": 7, "agree": 3, "disagree": 1, "tie": 2, "unparsable": 1, "failed": 0,
                      "rate": 0.75, "ci95": (0.30064, 0.95440)},
        "exact": {"aligned": {"accuracy": 0.5, "correct": 4, "scored": 8}, "base": {"accuracy": 0.125, "correct": 1,
                                                                                     "scored": 8}}}}}
    text = markdown(judged)
    assert ("aligned vs base: judge agrees with exact match on 3 of 7 decisive prompts (one answer right, one "
            "wrong): 75.0% of the 4 it decided, 95% CI 30.1% to 95.4%; 2 ties, 1 unparsable, 0 failed.") in text
    assert "Exact match on the same prompts: aligned 50.0% (4 / 8), base 12.5% (1 / 8)." in text


# ---- end to end through the served endpoint ---------------------------------------------------------

def eval_config(tmp_path, served, **eval_section):
    raw = {"run_dir": str(tmp_path / "run"), "serve": {"api_key_env": "RAYALIGN_TEST_KEY"},
           "eval": {"base_url": served["base_url"], "max_tokens": 8, "concurrency": 8, **eval_section}}
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


def read_examples(config):
    path = output_dir(config) / "examples.jsonl"
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def greedy(served, model, messages, max_tokens=8):
    c = openai.OpenAI(base_url=served["base_url"], api_key=served["key"], timeout=120)
    return c.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                     temperature=0).choices[0].message.content


def user(prompt):
    return [{"role": "user", "content": prompt}]


@integration
def test_exact_eval_through_the_endpoint_matches_direct_scoring(tmp_path, served):
    prompts = addition_prompts(24, seed=7)
    direct = {m: {p["id"]: greedy(served, m, user(p["prompt"])) for p in prompts} for m in ("aligned", "base")}
    # A third of the references are the student's own greedy answers and a third the random
    # model's, written differently (spacing, a final period) so that only the documented
    # normalisation makes them match; the rest are the true sums.
    for i, p in enumerate(prompts):
        if i % 3 == 0:
            p["reference"] = "  " + direct["aligned"][p["id"]].strip().replace(" ", "  ") + " ."
        elif i % 3 == 1:
            p["reference"] = "\n" + direct["base"][p["id"]].strip().replace(" ", "\t") + "\n"
    records.write_rows(prompts, tmp_path / "prompts", "jsonl")
    config = eval_config(tmp_path, served, kind="exact", data=str(tmp_path / "prompts"), models=["aligned", "base"])
    summary = run_eval(config)

    examples = read_examples(config)
    assert sorted((e["model"], e["id"]) for e in examples) == sorted(
        (m, p["id"]) for m in ("aligned", "base") for p in prompts)
    reference = {p["id"]: p["reference"] for p in prompts}
    question = {p["id"]: p["prompt"] for p in prompts}
    for model in ("aligned", "base"):
        mine = [e for e in examples if e["model"] == model]
        assert {e["id"]: e["response"] for e in mine} == direct[model], "eval answers = greedy answers"
        # Re-scored independently, from the stored responses and from the direct answers.
        rescored = sum(verifier.is_correct(e["response"], reference[e["id"]], question=question[e["id"]])
                       for e in mine)
        result = summary["results"][model]
        assert (result["n"], result["scored"], result["failed"]) == (24, 24, 0)
        assert result["correct"] == rescored == sum(
            verifier.is_correct(direct[model][i], reference[i], question=question[i]) for i in reference)
        assert "by_family" not in result, "no row has a family"
        assert rescored >= 8, "the references built from this model's answers must match"
        assert result["accuracy"] == pytest.approx(rescored / 24)
        assert tuple(result["ci95"]) == pytest.approx(wilson(rescored, 24))

    out = tmp_path / "run" / "eval"
    saved = json.loads((out / "manifest.json").read_text())
    assert saved["results"] == json.loads(json.dumps(summary["results"]))
    assert (saved["stage"], saved["key"]) == ("eval", fingerprint(dataclasses.asdict(config.eval)))
    table = (out / "results.md").read_text()
    acc = summary["results"]["aligned"]
    assert f"| aligned | {100 * acc['accuracy']:.1f}% |" in table and f"| {acc['correct']} / 24 | 0 |" in table
    import matplotlib.image

    assert matplotlib.image.imread(out / "results.png").shape[2] in (3, 4)


@integration
def test_eval_retries_transient_errors_and_records_a_failing_example_as_failed(tmp_path, served):
    prompts = addition_prompts(8, seed=11)
    records.write_rows(prompts, tmp_path / "prompts", "jsonl")
    doomed, flaky, dropped = prompts[0], prompts[1], prompts[2]

    def plan(body, attempt):
        text = body.decode()
        if doomed["prompt"] in text:
            return "500"
        if flaky["prompt"] in text and attempt == 1:
            return "429"
        if dropped["prompt"] in text and attempt == 1:
            return "disconnect"
        return None

    proxy = FaultProxy(served["url"], plan)
    try:
        config = eval_config(tmp_path, served, kind="exact", data=str(tmp_path / "prompts"),
                             base_url=proxy.start(), models=["aligned"], max_retries=2)
        summary = run_eval(config)
    finally:
        proxy.stop()
    result = summary["results"]["aligned"]
    examples = {e["id"]: e for e in read_examples(config)}
    assert len(examples) == 8
    assert examples[doomed["id"]]["failed"] is True and examples[doomed["id"]]["correct"] is None
    assert "HTTP 500" in examples[doomed["id"]]["error"] and "3 attempts" in examples[doomed["id"]]["error"]
    direct = {p["id"]: greedy(served, "aligned", user(p["prompt"])) for p in prompts[1:]}
    assert {i: e["response"] for i, e in examples.items() if i != doomed["id"]} == direct
    correct = sum(verifier.is_correct(direct[p["id"]], p["reference"], question=p["prompt"]) for p in prompts[1:])
    assert (result["n"], result["scored"], result["failed"], result["correct"]) == (8, 7, 1, correct)
    assert summary["retries"] == 2 + 1 + 1  # doomed twice, flaky and dropped once each
    assert proxy.faults == {"500": 3, "429": 1, "disconnect": 1}


@integration
def test_choice_eval_mmlu_and_mixeval_files(tmp_path, served):
    rng = random.Random(3)
    items, free = [], []
    for i, row in enumerate(addition_prompts(10, seed=21)):
        right = row["reference"]
        wrong = [" ".join(f"{int(right.replace(' ', '')) + d:04d}") for d in (1, 10, 100)]
        options = [right, *wrong]
        rng.shuffle(options)
        items.append({"id": row["id"], "question": row["prompt"], "choices": options,
                      "answer": "ABCD"[options.index(right)]})
        # Free-form: half the items also accept the student's own answer, spaced differently.
        own = greedy(served, "aligned", user(row["prompt"])).strip()
        targets = [right, own.replace(" ", "   ")] if i % 2 == 0 else [right]
        free.append({"id": row["id"] + "-free", "problem": row["prompt"], "target": targets})
    (tmp_path / "bench.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items + free))
    config = eval_config(tmp_path, served, kind="choice", data=str(tmp_path / "bench.jsonl"), models=["aligned"])
    result = run_eval(config)["results"]["aligned"]

    by_id = {i["id"]: i for i in items + free}
    correct = unparsed = 0
    for e in read_examples(config):
        item = by_id[e["id"]]
        text = " ".join(e["response"].split())
        if "choices" in item:  # the student answers with digits, so only an option's text can match
            matching = [k for k, o in enumerate(item["choices"]) if o == text]
            unparsed += not matching
            correct += bool(matching) and "ABCD"[matching[0]] == item["answer"]
        else:
            correct += text in [" ".join(t.split()) for t in item["target"]]
        assert e["correct"] is not None and not e["failed"]
    assert (result["n"], result["scored"], result["correct"], result["unparsed"]) == (20, 20, correct, unparsed)
    assert correct >= 5

    # Free-form answers graded by a judge model instead (structured, so every grade parses).
    (tmp_path / "free.jsonl").write_text("".join(json.dumps(i) + "\n" for i in free))
    config = eval_config(tmp_path, served, kind="choice", data=str(tmp_path / "free.jsonl"), models=["aligned"],
                         judge_model="base", judge_structured=True, judge_max_chars=12, judge_max_tokens=64,
                         output=str(tmp_path / "graded"))
    result = run_eval(config)["results"]["aligned"]
    grades = [json.loads(e["grade"])["verdict"] for e in read_examples(config)]
    assert len(grades) == 10 and set(grades) <= {"correct", "incorrect"}
    assert (result["scored"], result["correct"], result["failed"]) == (10, grades.count("correct"), 0)


@integration
def test_judge_eval_counts_match_the_per_example_records(tmp_path, served):
    prompts = addition_prompts(6, seed=31)
    records.write_rows(prompts, tmp_path / "prompts", "jsonl")
    # The random tiny model as judge: structured output makes its verdicts parse.
    config = eval_config(tmp_path, served, kind="judge", data=str(tmp_path / "prompts"), models=["aligned", "base"],
                         judge_model="base", judge_structured=True, judge_max_chars=12, judge_max_tokens=64,
                         output=str(tmp_path / "structured"))
    summary = run_eval(config)
    (name, result), = summary["results"].items()
    assert name == "aligned vs base"
    examples = read_examples(config)
    assert len(examples) == 6
    outcomes = []
    for e in examples:
        assert len(e["judgments"]) == 2 and e["models"] == ["aligned", "base"]
        first, second = (json.loads(j)["verdict"] for j in e["judgments"])
        unswapped = {"A": "B", "B": "A", "tie": "tie"}[second]
        expected = first if first == unswapped else "tie"
        outcomes.append({"A": "win", "B": "loss", "tie": "tie"}[expected])
        assert e["outcome"] == outcomes[-1]
    counts = {k: outcomes.count(k) for k in ("win", "loss", "tie")}
    assert (result["wins"], result["losses"], result["ties"], result["unparsable"], result["failed"]) == (
        counts["win"], counts["loss"], counts["tie"], 0, 0)
    assert result["win_rate"] == pytest.approx((counts["win"] + counts["tie"] / 2) / 6)

    # Unstructured, the random judge never writes a <verdict> section: all unparsable, none failed.
    # Without references there is nothing to check the judge against: no agreement, no exact.
    records.write_rows([{"id": p["id"], "prompt": p["prompt"]} for p in prompts], tmp_path / "bare", "jsonl")
    config = eval_config(tmp_path, served, kind="judge", data=str(tmp_path / "bare"), models=["aligned", "base"],
                         judge_model="base", judge_max_tokens=8, output=str(tmp_path / "free_text"))
    result = run_eval(config)["results"]["aligned vs base"]
    assert (result["unparsable"], result["wins"], result["losses"], result["ties"], result["failed"]) == (6, 0, 0, 0, 0)
    assert result["win_rate"] is None
    assert "agreement" not in result and "exact" not in result
    assert all(not re.search(r"<verdict>", j) for e in read_examples(config) for j in e["judgments"])
    assert all(e["correct"] == [None, None] for e in read_examples(config))
    assert "agrees with exact match" not in (tmp_path / "free_text" / "results.md").read_text()


def as_chat(prompt):
    """One file holds text or chat rows, not both (question_prompts writes chat rows)."""
    return user(prompt) if isinstance(prompt, str) else prompt


@integration
def test_exact_eval_scores_each_family_through_the_endpoint(tmp_path, served):
    additions = addition_prompts(8, seed=41)
    for p in additions[:3]:  # the student's own answers, so that one family surely has right answers
        p["reference"] = greedy(served, "aligned", user(p["prompt"]))
    rows = ([{**p, "prompt": as_chat(p["prompt"]), "metadata": {"family": "addition"}} for p in additions[:6]]
            + [{**p, "prompt": as_chat(p["prompt"])} for p in additions[6:]]  # two rows without a family
            + question_prompts(16, "eval", seed=5))
    records.write_rows(rows, tmp_path / "prompts", "jsonl")
    config = eval_config(tmp_path, served, kind="exact", data=str(tmp_path / "prompts"), models=["aligned", "base"])
    summary = run_eval(config)

    by_id = {r["id"]: r for r in rows}
    examples = read_examples(config)
    for model in ("aligned", "base"):
        mine = [e for e in examples if e["model"] == model]
        assert sorted(e["id"] for e in mine) == sorted(by_id)
        # Re-scored from the stored responses, the question being the last user message.
        recount: dict[str | None, list[bool]] = {}
        for e in mine:
            row = by_id[e["id"]]
            right = verifier.is_correct(e["response"], row["reference"], question=row["prompt"][-1]["content"])
            assert e["correct"] is right and e["family"] == row.get("metadata", {}).get("family")
            recount.setdefault(e["family"], []).append(right)
        result = summary["results"][model]
        assert set(result["by_family"]) == {"addition", *FAMILIES}
        for family, rights in recount.items():
            if family is None:
                continue
            expected = {"n": len(rights), "scored": len(rights), "correct": sum(rights), "failed": 0,
                        "accuracy": pytest.approx(sum(rights) / len(rights)), "ci95": wilson(sum(rights), len(rights))}
            assert result["by_family"][family] == expected, family
        # The families add up to the whole, less the two rows without one.
        families = result["by_family"].values()
        assert (sum(f["n"] for f in families), sum(f["correct"] for f in families)) == (
            result["n"] - 2, result["correct"] - sum(recount[None]))
        assert (result["n"], result["scored"], result["failed"]) == (24, 24, 0)
    assert summary["results"]["aligned"]["by_family"]["addition"]["correct"] >= 3

    out = output_dir(config)
    assert json.loads((out / "manifest.json").read_text())["results"] == json.loads(json.dumps(summary["results"]))
    table = (out / "results.md").read_text()
    cells = [summary["results"][m]["by_family"]["addition"] for m in ("aligned", "base")]
    row = " | ".join(f"{100 * c['accuracy']:.1f}% ({c['correct']} / 6)" for c in cells)
    assert f"| addition | {row} |" in table


@integration
def test_judge_eval_reports_its_agreement_with_exact_match(tmp_path, served):
    prompts = addition_prompts(12, seed=51)
    for p in prompts[:6]:  # the student's own answers: right where the random model is wrong, so decisive
        p["reference"] = greedy(served, "aligned", user(p["prompt"]))
    records.write_rows(prompts, tmp_path / "prompts", "jsonl")
    config = eval_config(tmp_path, served, kind="judge", data=str(tmp_path / "prompts"), models=["aligned", "base"],
                         judge_model="base", judge_structured=True, judge_max_chars=12, judge_max_tokens=64)
    result = run_eval(config)["results"]["aligned vs base"]

    by_id = {p["id"]: p for p in prompts}
    recount = dict.fromkeys(("agree", "disagree", "tie", "unparsable", "failed"), 0)
    rights = [0, 0]
    examples = read_examples(config)
    for e in examples:
        row = by_id[e["id"]]
        correct = [verifier.is_correct(a["response"], row["reference"], question=row["prompt"]) for a in e["answers"]]
        assert e["correct"] == correct and e["reference"] == row["reference"]
        rights = [n + c for n, c in zip(rights, correct)]
        if correct.count(True) != 1:
            continue
        picked = {"win": 0, "loss": 1}.get(e["outcome"])
        verdict = e["outcome"] if picked is None else "agree" if correct[picked] else "disagree"
        recount[verdict] += 1
    got = result["agreement"]
    assert {k: got[k] for k in recount} == recount
    assert got["decisive"] == sum(recount.values()) == (got["agree"] + got["disagree"] + got["tie"]
                                                       + got["unparsable"] + got["failed"])
    assert got["decisive"] >= 6
    decided = recount["agree"] + recount["disagree"]
    assert got["rate"] == (recount["agree"] / decided if decided else None)
    assert got["ci95"] == wilson(recount["agree"], decided)
    for i, model in enumerate(("aligned", "base")):
        exact = result["exact"][model]
        assert (exact["n"], exact["scored"], exact["failed"], exact["correct"]) == (12, 12, 0, rights[i])

    table = (output_dir(config) / "results.md").read_text()
    assert (f"aligned vs base: judge agrees with exact match on {recount['agree']} of {got['decisive']} "
            "decisive prompts") in table
    assert "Exact match on the same prompts: aligned " in table and f"({rights[0]} / 12)" in table
