"""The real-text question families: splits, sizes, and answers the verifier can find."""

import re
from collections import Counter

import pytest

from rayalign.clair import verifier
from rayalign.questions import FAMILIES, SYSTEM_MESSAGES, in_split, question_prompts
from rayalign import records
from rayalign.records import prompt_messages


def fact(row):
    return row["id"].rsplit("-", 1)[0].replace("sum_in_words-", "sum-")


def test_splits_share_no_fact_and_are_deterministic():
    train, held_out = question_prompts(300, "train"), question_prompts(200, "eval")
    assert not {fact(r) for r in train} & {fact(r) for r in held_out}
    assert len({r["id"] for r in train}) == 300 and len({r["id"] for r in held_out}) == 200
    assert question_prompts(300, "train") == train
    assert question_prompts(300, "train", seed=1) != train
    # Evenly spread: 300 over 8 families is 38 or 37 each; 200 is 25 each.
    assert sorted(Counter(r["metadata"]["family"] for r in train).values()) == [37] * 4 + [38] * 4
    assert set(Counter(r["metadata"]["family"] for r in held_out).values()) == {25}
    # Every item appears once before any appears twice.
    per_item = Counter(fact(r) for r in held_out if r["metadata"]["family"] == "capital")
    assert set(per_item.values()) == {1}


def test_prompts_come_with_and_without_a_system_message(tmp_path):
    rows = question_prompts(200, "eval")
    systems = Counter(m[0]["content"] if m[0]["role"] == "system" else None for m in map(prompt_messages, rows))
    assert set(systems) == {None, *SYSTEM_MESSAGES}
    assert all(count >= 40 for count in systems.values())
    assert all(r["prompt"][-1]["role"] == "user" for r in rows)
    # One prompt file holds them all: chat rows throughout.
    records.write_rows(rows, tmp_path / "eval", "jsonl")
    assert records.load_prompts(tmp_path / "eval") == rows


def test_splits_cover_every_family_about_sixty_forty():
    for name, family in FAMILIES.items():
        keys = [key for key, _, _ in family()]
        share = sum(in_split(name, key, "train") for key in keys) / len(keys)
        assert 0.45 < share < 0.75, (name, share)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_the_verifier_finds_every_answer_and_corrects_a_wrong_one(name):
    items = FAMILIES[name]()
    answers = [answer for _, _, answer in items]
    for i, (key, phrasings, answer) in enumerate(items):
        for question in phrasings:
            assert verifier.is_correct(f"The answer is {answer}.", answer, question=question), (question, answer)
            # A wrong answer that is not one of the question's own words or numbers.
            words = re.findall(r"\w+", question.casefold())
            known = set(words) | {verifier.number_value(w) for w in words} - {None}
            wrong = next(a for a in answers[i + 1:] + answers[:i] if a != answer
                         and not set(a.casefold().split()) & known and verifier.number_value(a) not in known)
            response = f"I think it is {wrong}."
            assert not verifier.is_correct(response, answer, question=question), (question, wrong)
            assert verifier.revise(response, answer, question=question) == f"I think it is {answer}.", question


def test_unknown_family_and_too_many_prompts_are_refused():
    with pytest.raises(ValueError, match="unknown question family 'poems'"):
        question_prompts(5, "train", families=("poems",))
    with pytest.raises(ValueError, match=r"only \d+ distinct eval prompts exist in families capital"):
        question_prompts(10_000, "eval", families=("capital",))
