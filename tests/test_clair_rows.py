"""Row functions and the exactly-once writer of the CLAIR stage, called without a cluster."""

import json

import numpy as np
import pytest

from rayalign.clair import outcomes, stages
from rayalign.clair.revision import REVISION_SCHEMA, bounded
from rayalign.config import ReviserConfig, SamplingConfig


def unit(answer="0 7 1 8", reference="0 7 1 9", prompt="add: 1 3 7 + 5 8 2", uid="u1", **extra):
    row = {"unit_id": uid, "prompt_id": uid.split("#")[0], "prompt_json": json.dumps(prompt), "reference": reference,
           "sample": 0, "seed": 1, "answer_text": answer, "answer_tokens": 5, "answer_truncated": False,
           "answer_error": ""}
    return stages.answer_outcome({**row, **extra})


def test_units_and_seeds_are_stable():
    prompts = [{"id": "a", "prompt": "x", "reference": "1"}, {"id": "b", "prompt": [{"role": "user", "content": "y"}]}]
    units = outcomes.make_units(prompts, samples=2, seed=7)
    assert [u["unit_id"] for u in units] == ["a#0", "a#1", "b#0", "b#1"]
    assert json.loads(units[2]["prompt_json"]) == [{"role": "user", "content": "y"}]
    assert units[2]["reference"] == ""
    assert units == outcomes.make_units(prompts, samples=2, seed=7)
    assert units[0]["seed"] != units[1]["seed"]
    assert outcomes.make_units(prompts, 1, 7)[0]["unit_id"] == "a"
    assert outcomes.unit_seed(7, "a#0") != outcomes.unit_seed(8, "a#0")


def test_answer_outcome_rejects_failed_and_truncated_answers():
    assert unit()["outcome"] == ""
    assert unit(answer_error="prompt too long")["outcome"] == "generation_failed"
    truncated = unit(answer_truncated=True)
    assert (truncated["outcome"], truncated["detail"]) == ("answer_too_long", "the answer reached 5 tokens")


def test_verifier_reviser_outcomes():
    pair = stages.verifier_revise(unit(), None)
    assert (pair["outcome"], pair["chosen"], pair["rejected"]) == ("pair", "0 7 1 9", "0 7 1 8")
    right = stages.verifier_revise(unit(answer="0 7 1 9"), None)
    assert (right["outcome"], right["detail"]) == ("already_correct", "the final answer '0 7 1 9' is already right")
    assert stages.verifier_revise(unit(reference=""), None)["outcome"] == "no_reference"
    nomatch = stages.verifier_revise(unit(answer="no idea"), r"answer:\s*(.+)")
    assert (nomatch["outcome"], nomatch["detail"]) == ("no_answer", "no final answer matched answer_pattern")
    failed = stages.verifier_revise(unit(answer_error="boom"), None)
    assert failed["outcome"] == "generation_failed"


def test_verifier_judge_and_stronger():
    row = {**unit(answer="0 7 1 8"), "answer_b": "9 9 9 9"}
    judged = stages.verifier_judge(row, None)
    assert (judged["outcome"], judged["chosen"], judged["rejected"]) == ("pair", "0 7 1 8", "9 9 9 9")
    tie = stages.verifier_judge({**row, "answer_b": "0 7 1 8"}, None)
    assert tie["outcome"] == "tie"
    stronger = stages.verifier_stronger(unit())
    assert (stronger["chosen"], stronger["rejected"]) == ("0 7 1 9", "0 7 1 8")


def replied(row, text, error="", truncated=False):
    return {**row, "reply_text": text, "reply_error": error, "reply_truncated": truncated, "reply_tokens": 9}


def test_model_revision_outcomes():
    row = unit(answer="The capital of France is Lyon.")
    pair = stages.revision_outcome(replied(row, "Lyon is wrong.\n<revision>The capital of France is Paris."
                                                "</revision>"), structured=False)
    assert (pair["outcome"], pair["chosen"]) == ("pair", "The capital of France is Paris.")
    assert pair["raw"].startswith("Lyon is wrong.")
    cases = {
        "unparsable": replied(row, "It should say Paris."),
        "empty_revision": replied(row, "<revision>  </revision>"),
        "identical": replied(row, "<revision>The capital of France is Lyon.</revision>"),
        "request_failed": replied(row, "", error="HTTP 500 from the endpoint (after 7 attempts)"),
        "revision_too_long": replied(row, "<revision>The capital", truncated=True),
    }
    for reason, reply in cases.items():
        assert stages.revision_outcome(reply, structured=False)["outcome"] == reason
    structured = stages.revision_outcome(replied(row, json.dumps({"reasoning": "r", "revision": "Paris."})), True)
    assert structured["chosen"] == "Paris."


def test_judge_outcome_needs_agreement_in_both_orders():
    row = {**unit(answer="first"), "answer_b": "second"}
    first = replied({**row, "order": 0}, "<verdict>B</verdict>")
    second = replied({**row, "order": 1}, "<verdict>A</verdict>")  # swapped: A is answer_b
    judged = stages.judge_outcome(first, second, structured=False)
    assert (judged["outcome"], judged["chosen"], judged["rejected"]) == ("pair", "second", "first")
    biased = stages.judge_outcome(first, replied({**row, "order": 1}, "<verdict>B</verdict>"), False)
    assert (biased["outcome"], biased["detail"]) == ("tie", "verdicts B then B (swapped)")
    garbled = stages.judge_outcome(first, replied({**row, "order": 1}, "A is better"), False)
    assert (garbled["outcome"], garbled["detail"]) == ("unparsable", "judge: no <verdict>...</verdict> section")


def test_requests_skip_rows_that_already_failed():
    reviser = ReviserConfig(backend="vllm", model="m", structured_output=True, structured_max_chars=40)
    failed = unit(answer_error="boom")
    assert stages.revision_request(reviser)(failed)["max_tokens"] == 1
    request = stages.revision_request(reviser)(unit())
    assert request["schema"]["properties"]["revision"] == {"type": "string", "maxLength": 40}
    assert "# Student answer\n0 7 1 8" in request["messages"][0]["content"]
    target = stages.target_request(SamplingConfig(max_tokens=12, temperature=0.5, top_p=0.9))(unit(prompt="hi"))
    assert target == {"messages": [{"role": "user", "content": "hi"}], "temperature": 0.5, "top_p": 0.9,
                      "max_tokens": 12, "seed": 1, "schema": None}


def test_bounded_schema_leaves_enums_alone():
    schema = bounded(REVISION_SCHEMA, 10)
    assert schema["properties"]["reasoning"]["maxLength"] == 10
    assert bounded(REVISION_SCHEMA, None) is REVISION_SCHEMA


def test_token_budget_reserves_and_settles():
    budget = stages.TokenBudget(100)
    assert budget.reserve(60)
    assert not budget.reserve(50)        # 60 reserved + 50 > 100
    budget.settle(60, 30)                # the request used fewer tokens than estimated
    assert budget.reserve(50) and budget.spent() == 30
    assert stages.estimate_tokens({"messages": [{"content": "x" * 40}], "max_tokens": 10}) == 21


def batch_of(rows):
    return {key: np.array([r[key] for r in rows]) for key in rows[0]}


def test_shard_writer_writes_each_unit_once_and_is_idempotent(tmp_path):
    rows = [stages.verifier_revise(unit(uid="a"), None),
            stages.verifier_revise(unit(uid="b", answer="0 7 1 9"), None),
            {**stages.verifier_revise(unit(uid="c"), None), "outcome": outcomes.DEFERRED}]
    for row in rows:
        row.setdefault("raw", "")
    writer = outcomes.ShardWriter(str(tmp_path), "jsonl", source="clair", reviser="verifier")
    counts = writer(batch_of(rows))
    assert counts == {"pairs": [1], "rejects": [1], "deferred": [1], "generated_tokens": [15],
                      "reviser_tokens": [0]}
    writer(batch_of(rows))  # a retried batch rewrites the same shards
    (pair_file,) = (tmp_path / "pairs").iterdir()
    (reject_file,) = (tmp_path / "rejects").iterdir()
    pair = json.loads(pair_file.read_text())
    assert pair == {"id": "a", "prompt": "add: 1 3 7 + 5 8 2", "chosen": "0 7 1 9", "rejected": "0 7 1 8",
                    "source": "clair", "reviser": "verifier", "jaccard": pytest.approx(3 / 5), "levenshtein": 1,
                    "metadata": {"prompt_id": "a", "sample": 0}}
    reject = json.loads(reject_file.read_text())
    assert (reject["id"], reject["reason"], reject["answer"]) == ("b", "already_correct", "0 7 1 9")
    assert outcomes.completed_ids(tmp_path) == {"a", "b"}  # the deferred unit stays pending


def test_pairs_keep_the_token_ids_the_target_generated():
    row = {**unit(answer="0 7 1 8", answer_token_ids=np.array([9, 8, 7, 2])), "raw": ""}  # as Ray Data passes it
    row = stages.verifier_revise(row, None)
    pair = outcomes.pair_row(row, row["chosen"], row["rejected"], "clair", "verifier")
    assert pair["metadata"] == {"prompt_id": "u1", "sample": 0, "rejected_token_ids": [9, 8, 7, 2]}
    # Judge mode: both sides are samples of the target, each with its own ids.
    judged = {**row, "answer_b": "0 7 1 9", "answer_b_token_ids": [9, 8, 6, 2]}
    pair = outcomes.pair_row(judged, "0 7 1 9", "0 7 1 8", "onpolicy_judge", "verifier")
    assert (pair["metadata"]["chosen_token_ids"], pair["metadata"]["rejected_token_ids"]) == ([9, 8, 6, 2],
                                                                                              [9, 8, 7, 2])


def test_conversational_prompts_give_conversational_pairs(tmp_path):
    row = stages.verifier_revise(unit(prompt=[{"role": "user", "content": "add: 1 + 2"}]), None)
    pair = outcomes.pair_row(row, row["chosen"], row["rejected"], "clair", "verifier")
    assert pair["prompt"] == [{"role": "user", "content": "add: 1 + 2"}]
    assert pair["chosen"] == [{"role": "assistant", "content": "0 7 1 9"}]


def test_shards_are_committed_by_count_or_by_time_whichever_comes_first(tmp_path):
    """A crash loses at most one commit window: a shard as soon as rows_per_shard units wait, and
    whatever waits once the interval has passed since the last shard."""
    now = [0.0]

    def arriving(batches):
        for seconds, ids in batches:  # each batch arrives `seconds` after the previous one
            now[0] += seconds
            rows = [{**stages.verifier_revise(unit(uid=i), None), "raw": ""} for i in ids]
            yield batch_of(rows)

    writer = outcomes.ShardWriter(str(tmp_path), "jsonl", source="clair", reviser="verifier")
    batches = [(1, ["a", "b"]), (1, ["c", "d", "e"]),  # 5 waiting: a shard of 3, 2 left
               (1, ["f"]),                            # 3 waiting: a shard of 3 (at t=3)
               (5, ["g"]), (56, ["h"]),               # 2 waiting, 61 s after the last shard: committed
               (1, ["i"])]                            # the rest at the end
    counts = outcomes.commit_stream(arriving(batches), writer, rows_per_shard=3, seconds=60, clock=lambda: now[0])
    assert [c["pairs"] for c in counts] == [3, 3, 2, 1]
    shards = [sorted(json.loads(line)["id"] for line in f.read_text().splitlines())
              for f in (tmp_path / "pairs").iterdir()]
    assert sorted(shards) == [["a", "b", "c"], ["d", "e", "f"], ["g", "h"], ["i"]]
    assert outcomes.completed_ids(tmp_path) == set("abcdefghi")
