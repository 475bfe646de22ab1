"""The demo's summary: the table a user reads at the end of `rayalign demo`, from a run's files."""

import json

from rayalign.demo import write_summary
from rayalign.records import write_shard


def accuracy(correct, n):
    return {"n": n, "scored": n, "correct": correct, "failed": 0, "accuracy": correct / n, "ci95": [0.1, 0.9]}


def test_summary_shows_families_the_judge_and_real_revisions(tmp_path):
    (tmp_path / "clair").mkdir()
    (tmp_path / "train").mkdir()
    contrast = {"jaccard": {"mean": 0.8, "median": 0.85}, "levenshtein": {"mean": 5.2, "median": 4.0}}
    (tmp_path / "clair" / "manifest.json").write_text(json.dumps(
        {"pairs": 2, "rejects_by_reason": {"already_correct": 3, "no_answer": 1, "tie": 0}, "contrast": contrast}))
    (tmp_path / "train" / "manifest.json").write_text(json.dumps(
        {"steps": 16, "final_metrics": {"loss": 0.95, "rewards/chosen": 0.01, "rewards/rejected": -0.05}}))
    ask = [{"role": "user", "content": "What is the capital of Kenya?"}]
    write_shard([{"id": "b", "prompt": ask, "chosen": [{"role": "assistant", "content": "It is Nairobi."}],
                  "rejected": [{"role": "assistant", "content": "It is\nMombasa."}]},
                 {"id": "a", "prompt": [{"role": "user", "content": "What is 2 + 3?"}],
                  "chosen": [{"role": "assistant", "content": "2 + 3 = 5"}],
                  "rejected": [{"role": "assistant", "content": "2 + 3 = 6"}]}],
                tmp_path / "clair" / "pairs" / "part-0.jsonl")
    evaluation = {"results": {
        "base": {**accuracy(10, 20), "by_family": {"capital": accuracy(6, 10), "sum": accuracy(4, 10)}},
        "aligned": {**accuracy(12, 20), "by_family": {"capital": accuracy(7, 10), "sum": accuracy(5, 10),
                                                      "plural": accuracy(1, 4)}}}}
    judged = {"judge_model": "base", "results": {"aligned vs base": {
        "n": 8, "win_rate": 0.5, "wins": 1, "losses": 1, "ties": 6, "unparsable": 0,
        "agreement": {"decisive": 3, "agree": 1, "disagree": 1, "tie": 1, "rate": 0.5}}}}
    manifest = {"result": {"eval": evaluation}, "stages": {"model": {"seconds": 1.0}, "clair": {"seconds": 30.0}}}
    # Per prompt: 3 right only after training, 1 only before, 2 alike.
    outcomes = {"p1": (False, True), "p2": (False, True), "p3": (False, True), "p4": (True, False),
                "p5": (True, True), "p6": (False, False), "p7": (None, True)}  # p7's base request failed
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "examples.jsonl").write_text("".join(
        json.dumps({"id": i, "model": m, "correct": c}) + "\n"
        for i, pair in outcomes.items() for m, c in zip(("base", "aligned"), pair)))

    summary = write_summary(tmp_path, manifest, "Model: a test model", judged, examples=2)

    lines = summary["table"].splitlines()
    assert lines[2:4] == ["| base | 50.0% | 10.0% - 90.0% | 20 |", "| aligned | 60.0% | 10.0% - 90.0% | 20 |"]
    assert lines[lines.index("| family | base | aligned |") + 2:][:3] == [
        "| capital | 60.0% (6 / 10) | 70.0% (7 / 10) |", "| plural | n/a | 25.0% (1 / 4) |",
        "| sum | 40.0% (4 / 10) | 50.0% (5 / 10) |"]
    assert "APO-zero training on CLAIR pairs raised accuracy: +10.0 points (aligned minus base)." in lines
    assert ("Judge (base, both orders) on 8 held-out prompts, aligned vs base: win rate 50.0% (1 wins, 1 losses, "
            "6 ties, 0 unparsable); it agrees with exact match on 1 of 3 prompts where exactly one answer is right "
            "(50.0%).") in lines
    # Sign test by hand: 4 discordant prompts, 3 one way: 2 * (C(4,3) + C(4,4)) / 2^4 = 0.625.
    assert "Prompt by prompt: 3 right only after training, 1 only before (two-sided sign test p = 0.62)." in lines
    assert "Pairs built: 2 (rejects: already_correct 3, no_answer 1)" in lines
    assert "Model: a test model" in lines and "| clair | 30.0 |" in lines
    report = (tmp_path / "report.md").read_text()
    # Example revisions: sorted by id, each message on one line.
    assert ("- **What is 2 + 3?**\n  - rejected: 2 + 3 = 6\n  - chosen: 2 + 3 = 5\n"
            "- **What is the capital of Kenya?**\n  - rejected: It is Mombasa.\n  - chosen: It is Nairobi.") in report
    assert summary["change"] == 12 / 20 - 10 / 20
