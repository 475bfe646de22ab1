"""The tables of `rayalign replicate`: changes over the base by seed, intervals, contrast."""

import json

import pytest

from rayalign.config import ConfigError
from rayalign.replicate import mean_interval, parse_overrides, summarize


def test_mean_interval_is_a_t_interval_over_seeds():
    mean, half = mean_interval([0.10, 0.04, 0.07])
    assert mean == pytest.approx(0.07)
    # stdev 0.03, t(0.975, 2 dof) = 4.303, sqrt(3)
    assert half == pytest.approx(4.303 * 0.03 / 3 ** 0.5)
    assert mean_interval([0.05]) == (0.05, None)


def contrast(jaccard, levenshtein):
    return {"jaccard": {"mean": jaccard}, "levenshtein": {"mean": levenshtein}}


RIGHT = {"chosen": 1.0, "rejected": 0.0}


def test_summarize_subtracts_each_seeds_own_base_and_names_failures(tmp_path):
    seeds = [{"seed": 0, "student_seed": 1, "student_check_accuracy": 0.44, "base": {"accuracy": 0.40, "ci95": [0.36, 0.44]}},
             {"seed": 10, "student_seed": 10, "student_check_accuracy": 0.50, "base": {"accuracy": 0.50, "ci95": [0.46, 0.54]}}]
    cells = [
        {"seed": 0, "set": "clair", "loss": "apo_zero", "eval": {"accuracy": 0.46}, "pairs": 100, "contrast": contrast(0.6, 1.5), "correct": RIGHT},
        {"seed": 10, "set": "clair", "loss": "apo_zero", "eval": {"accuracy": 0.52}, "pairs": 90, "contrast": contrast(0.5, 2.5), "correct": {"chosen": 0.8, "rejected": 0.1}},
        {"seed": 0, "set": "clair", "loss": "dpo", "eval": {"accuracy": 0.38}, "pairs": 100, "contrast": contrast(0.6, 1.5), "correct": RIGHT},
        {"seed": 10, "set": "clair", "loss": "dpo", "error": "TrainError: boom", "pairs": 90, "contrast": contrast(0.5, 2.5), "correct": {"chosen": 0.8, "rejected": 0.1}},
    ]
    result = summarize(tmp_path, seeds, cells, ["clair"], ["apo_zero", "dpo"], 12.0)
    rows = {r["loss"]: r for r in result["comparison"]}
    assert rows["apo_zero"]["changes"] == pytest.approx([0.06, 0.02])
    assert rows["apo_zero"]["mean_change"] == pytest.approx(0.04)
    assert rows["dpo"]["changes"] == pytest.approx([-0.02])
    assert rows["dpo"]["failed"] == [10]
    assert result["contrast"] == [{"set": "clair", "pairs": [100, 90], "jaccard": pytest.approx(0.55),
                                   "levenshtein": pytest.approx(2.0), "chosen_correct": pytest.approx(0.9),
                                   "rejected_correct": pytest.approx(0.05)}]
    table = (tmp_path / "replication.md").read_text()
    assert "| CLAIR | APO-zero | +4.0 |" in table
    assert "| CLAIR | 100, 90 | 0.550 | 2.00 | 90.0% | 5.0% |" in table
    assert "| CLAIR | DPO | -2.0 | n/a | -2.0 (failed: seeds [10]) |" in table
    assert "| 0 | 1 | 44.0% | 40.0% | 36.0% - 44.0% | n/a |" in table
    # within-seed differences count only seeds where both cells were evaluated
    assert result["paired"] == [{"a": ["clair", "dpo"], "b": ["clair", "apo_zero"], "diffs": [pytest.approx(-0.08)],
                                 "mean": pytest.approx(-0.08), "ci95": None}]
    assert "| CLAIR DPO - CLAIR APO-zero | -8.0 | n/a | -8.0 |" in table
    saved = json.loads((tmp_path / "replication.json").read_text())
    assert saved["comparison"][0]["mean_change"] == pytest.approx(0.04)
    assert (tmp_path / "accuracy.png").stat().st_size > 0 and (tmp_path / "contrast.png").stat().st_size > 0


def test_overrides_nest_and_bad_ones_name_the_item():
    assert parse_overrides(["train.learning_rate=3e-6", "clair.sampling.n=4"]) == {
        "train": {"learning_rate": "3e-6"}, "clair": {"sampling": {"n": 4}}}
    with pytest.raises(ConfigError, match="'serve.port=1': expected train.KEY=VALUE"):
        parse_overrides(["serve.port=1"])


def test_winners_correct_counts_right_answers_by_the_verifier(tmp_path):
    from rayalign import records
    from rayalign.replicate import winners_correct

    prompts = [{"id": "a", "prompt": "add: 1 + 1", "reference": "0 0 0 2"},
               {"id": "b", "prompt": "add: 2 + 2", "reference": "0 0 0 4"}]
    pairs = [{"id": "a#0", "prompt": "add: 1 + 1", "chosen": "0 0 0 2", "rejected": "0 0 0 3", "source": "t", "reviser": "t"},
             {"id": "b#0", "prompt": "add: 2 + 2", "chosen": "0 0 0 5", "rejected": "0 0 0 4", "source": "t", "reviser": "t"}]
    records.write_rows(pairs, tmp_path / "pairs", "jsonl")
    assert winners_correct(tmp_path / "pairs", prompts) == {"chosen": 0.5, "rejected": 0.5}
