"""`train.loss: auto` picks APO-zero when the winners beat the policy and APO-down when the
policy beats the winners, measured with the real policy on vLLM and the configured judge."""

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import yaml

from rayalign import events, records
from rayalign.config import ConfigError, load_config
from rayalign.tasks import addition_prompts
from rayalign.train.auto import (ANSWERS_FILE, CHOICE_FILE, answer_inputs, choice_inputs, choose_loss, decide,
                                 resolve_loss, saved_answers)
from tests.conftest import SERVER_KEY
from tests.test_clair import ENGINE


def test_decide_by_the_majority_of_decisive_comparisons():
    assert decide(7, 3) == ("apo_zero", "the chosen answers beat the policy's own answers (7 to 3)")
    assert decide(2, 5) == ("apo_down", "the policy's own answers beat the chosen answers (5 to 2)")
    assert decide(4, 4)[0] == "apo_zero"
    assert "no decisive difference (4 to 4)" in decide(4, 4)[1]


def make_run(tmp_path, student, ray_session, chosen_of, reviser=None, sample=24):
    prompts = addition_prompts(sample, seed=11)
    records.write_rows(prompts, tmp_path / "prompts", "jsonl")
    pairs = [{"id": p["id"], "prompt": p["prompt"], "chosen": chosen_of(p), "rejected": "9 9 9 9 9 9",
              "source": "test", "reviser": "test"} for p in prompts]
    records.write_rows(pairs, tmp_path / "pairs", "jsonl")
    raw = {"run_dir": str(tmp_path / "run"),
           "cluster": {"address": ray_session.get_runtime_context().gcs_address},
           "clair": {"prompts": str(tmp_path / "prompts"), "engine": ENGINE,
                     "sampling": {"max_tokens": 8}, "reviser": reviser or {"backend": "verifier"}},
           "train": {"model": str(student), "pairs": str(tmp_path / "pairs"), "loss": "auto",
                     "output": str(tmp_path / "run" / "train"), "auto_sample": sample}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


@pytest.mark.integration
def test_the_choice_follows_the_winners_and_other_pairs_reuse_the_policys_answers(tmp_path, student, ray_session,
                                                                                   capsys):
    # The winners are the reference answers: the partly-right student can at best tie them.
    config = make_run(tmp_path, student, ray_session, chosen_of=lambda p: p["reference"])
    evidence = choose_loss(config)
    assert evidence["choice"] == "apo_zero"
    assert evidence["policy_wins"] == 0
    assert evidence["chosen_wins"] > 0
    assert evidence["chosen_wins"] + evidence["ties"] + sum(evidence["unscored"].values()) == 24
    saved = json.loads((tmp_path / "run" / "train" / CHOICE_FILE).read_text())
    assert saved["choice"] == "apo_zero" and saved["chosen_wins"] == evidence["chosen_wins"]
    # resolve_loss puts the choice into the train config; the saved evidence is reused.
    resolved = resolve_loss(config)
    assert resolved.train.loss == "apo_zero"
    # The model and the pairs count by content: touched or copied, they are the same inputs.
    stamp = (tmp_path / "run" / "train" / CHOICE_FILE).stat().st_mtime_ns
    for path in [*Path(config.train.pairs).rglob("*"), *Path(config.train.model).rglob("*")]:
        os.utime(path)
    assert resolve_loss(config).train.loss == "apo_zero"
    assert (tmp_path / "run" / "train" / CHOICE_FILE).stat().st_mtime_ns == stamp
    assert "loss auto: 24 policy answers generated, 0 reused" in capsys.readouterr().out

    # Other pairs for the same prompts, whose winners answer in words, not digits: the student's
    # four digits are always closer. Only the pairs changed, so the policy's answers are reused
    # and no engine starts.
    shutil.rmtree(tmp_path / "pairs")
    shutil.rmtree(tmp_path / "prompts")
    config = make_run(tmp_path, student, ray_session, chosen_of=lambda p: "no idea at all")
    started = time.time()
    evidence = choose_loss(config)
    assert evidence["choice"] == "apo_down"
    assert evidence["chosen_wins"] == 0
    assert evidence["policy_wins"] > 12
    assert evidence["policy_wins"] + evidence["ties"] + sum(evidence["unscored"].values()) == 24
    assert "the policy's own answers beat the chosen answers" in evidence["reason"]
    assert "loss auto: 0 policy answers generated, 24 reused" in capsys.readouterr().out
    assert [e for e in events.read(os.environ[events.ENV]) if e["kind"] == "engine" and e["time"] >= started] == []


def test_saved_policy_answers_are_reused_only_for_the_same_model_engine_and_max_tokens(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"train": {"model": str(tmp_path / "model"), "loss": "auto"}}))
    config = load_config(path)
    inputs = answer_inputs(config)
    saved = tmp_path / ANSWERS_FILE
    saved.write_text(json.dumps({"inputs": inputs, "answers": {"p": {"answer_text": "1 2 3 4"}}}))
    assert saved_answers(saved, answer_inputs(config)) == {"p": {"answer_text": "1 2 3 4"}}
    for change in ("clair.sampling.max_tokens=6", "clair.engine.dtype=bfloat16", "clair.engine.max_model_len=128"):
        assert saved_answers(saved, answer_inputs(load_config(path, [change]))) == {}, change
    (tmp_path / "model" / "config.json").write_text('{"changed": 1}')
    assert saved_answers(saved, answer_inputs(config)) == {}
    assert saved_answers(tmp_path / "missing.json", inputs) == {}


def test_the_saved_choice_is_reused_only_for_the_same_answers_pairs_and_judge(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    records.write_rows([{"id": "a", "prompt": "add: 1", "chosen": "x", "rejected": "y"}], tmp_path / "pairs", "jsonl")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"train": {"model": str(tmp_path / "model"), "pairs": str(tmp_path / "pairs"),
                                              "loss": "auto"}}))

    def inputs(*changes, references=None):
        config = load_config(path, list(changes))
        return choice_inputs(config, answer_inputs(config), references or {"add: 1": "1"})

    same = inputs()
    assert inputs() == same
    for change in ("clair.engine.dtype=bfloat16", "clair.engine.max_model_len=128", "clair.sampling.max_tokens=6",
                   "clair.reviser.answer_pattern=(\\d+)", "train.auto_sample=7", "train.seed=3"):
        assert inputs(change) != same, change
    assert inputs("clair.reviser.backend=vllm", "clair.reviser.model=/m/judge", "clair.reviser.engine.dtype=float16") \
        != inputs("clair.reviser.backend=vllm", "clair.reviser.model=/m/judge")
    assert inputs("clair.max_total_tokens=500") != same
    # A judge's rate limits, retries and prices do not change its verdicts.
    for change in ("clair.reviser.max_concurrency=2", "clair.reviser.requests_per_second=1",
                   "clair.reviser.max_retries=1", "clair.reviser.timeout_s=5",
                   "clair.reviser.price_per_million_input_tokens=3"):
        assert inputs(change) == same, change
    assert inputs(references={"add: 1": "2"}) != same
    shutil.rmtree(tmp_path / "pairs")
    records.write_rows([{"id": "a", "prompt": "add: 1", "chosen": "x", "rejected": "z"}], tmp_path / "pairs", "jsonl")
    assert inputs() != same


@pytest.mark.integration
def test_an_llm_judge_accounts_for_every_prompt(tmp_path, student, ray_session, openai_server):
    # A random-weight judge on vLLM's OpenAI server, with JSON-schema verdicts: whatever it
    # says, every sampled prompt is a win, a tie or a counted unscored comparison.
    reviser = {"backend": "openai", "base_url": openai_server["base_url"], "model": "tiny", "api_key_env": "RAYALIGN_TEST_KEY",
               "structured_output": True, "structured_max_chars": 16, "max_tokens": 96}
    config = make_run(tmp_path, student, ray_session, chosen_of=lambda p: p["reference"], reviser=reviser, sample=6)
    evidence = choose_loss(config)
    counted = evidence["chosen_wins"] + evidence["policy_wins"] + evidence["ties"] + sum(evidence["unscored"].values())
    assert counted == 6
    assert evidence["judge"] == "openai:tiny"
    assert evidence["choice"] == decide(evidence["chosen_wins"], evidence["policy_wins"])[0]
    assert SERVER_KEY not in (tmp_path / "run" / "train" / CHOICE_FILE).read_text()


def test_the_verifier_needs_reference_answers(tmp_path):
    records.write_rows([{"id": "a", "prompt": "add: 1", "chosen": "x", "rejected": "y", "source": "t",
                         "reviser": "t"}], tmp_path / "pairs", "jsonl")
    raw = {"run_dir": str(tmp_path / "run"),
           "train": {"model": str(tmp_path), "pairs": str(tmp_path / "pairs"), "loss": "auto",
                     "output": str(tmp_path / "out")}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="train.loss: auto judges with the verifier .* needs clair.prompts"):
        choose_loss(load_config(path))


def test_auto_is_a_valid_loss_and_typos_are_not(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"train": {"loss": "auto"}}))
    assert load_config(path).train.loss == "auto"
    path.write_text(yaml.safe_dump({"train": {"loss": "autoo"}}))
    with pytest.raises(ConfigError, match=r"train.loss: must be one of .* or auto, not 'autoo'"):
        load_config(path)
