"""The CLAIR stage end to end on real Ray Data and vLLM (CPU), with each reviser backend."""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest
import yaml

from rayalign import records
from rayalign.clair import contrast, verifier
from rayalign.clair.pipeline import run_clair, shaping_fields
from rayalign.config import ConfigError, load_config
from rayalign.stage import fingerprint
from rayalign.tasks import addition_prompts
from tests.conftest import PYTHON, ROOT, SERVER_KEY
from tests.fault_proxy import FaultProxy

pytestmark = pytest.mark.integration

# No torch.compile warm-up: saves ~20 s per engine start here.
ENGINE = {"dtype": "float32", "max_model_len": 256, "gpu_memory_utilization": 0.1, "batch_size": 8,
          "engine_args": {"enforce_eager": True}}


def setup_run(tmp_path, student, ray_session, prompts, **sections):
    records.write_rows(prompts, tmp_path / "prompts", "jsonl")
    clair = {"prompts": str(tmp_path / "prompts"), "target_model": str(student), "engine": ENGINE,
             "sampling": {"temperature": 1.0, "max_tokens": 8}}
    for key, value in sections.items():
        clair[key] = {**clair.get(key, {}), **value} if isinstance(value, dict) else value
    raw = {"run_dir": str(tmp_path / "run"),
           "cluster": {"address": ray_session.get_runtime_context().gcs_address}, "clair": clair}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, load_config(path)


def committed(folder):
    """The rows of a folder's committed shards; none while the stage has made the folder but committed nothing yet."""
    if not folder.is_dir() or not any(p.suffix in (".jsonl", ".parquet") for p in folder.iterdir()):
        return []
    return [r.value for r in records.read_records(folder)]


def outputs(out):
    return committed(out / "pairs"), committed(out / "rejects")


def assert_exactly_once(out, expected_ids):
    pairs, rejects = outputs(out)
    ids = [p["id"] for p in pairs] + [r["id"] for r in rejects]
    assert sorted(ids) == sorted(expected_ids), "every unit exactly once in pairs or rejects"
    assert not [p for p in out.rglob("*.tmp")]
    return pairs, rejects


def test_verifier_pairs_exactly_once_after_a_kill(tmp_path, student, ray_session):
    # Enough prompts for the run to take several commit windows (the student answers ~15 a second).
    prompts = addition_prompts(300, seed=5)
    # One prompt longer than the engine's context: the engine cannot answer it.
    prompts.append({"id": "too-long", "prompt": "add: " + "1 " * 400, "reference": "0 0 0 0"})
    # Shards by time only (rows_per_shard is never reached): every second the finished units are
    # committed, so a kill at about 70% of the run finds about 70% of the units on disk.
    path, config = setup_run(tmp_path, student, ray_session, prompts, rows_per_shard=1000, commit_seconds=1,
                             engine={"batch_size": 1})
    out = tmp_path / "run" / "clair"
    log = tmp_path / "clair.log"
    with open(log, "w") as sink:
        proc = subprocess.Popen([PYTHON, "-m", "rayalign.cli", "clair", "--config", str(path)], cwd=ROOT,
                                stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 400
    while time.time() < deadline and proc.poll() is None:
        if sum(len(part) for part in outputs(out)) >= 0.7 * len(prompts):
            break
        time.sleep(0.1)
    assert proc.poll() is None, f"the run ended before the kill: {log.read_text()[-3000:]}"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = sum(len(part) for part in outputs(out))
    assert 0.7 * len(prompts) <= before < len(prompts), f"{before} of {len(prompts)} units written before the kill"

    # A prompt whose pairs are done may not change under its id: refused before anything is sent.
    files = sorted(p.name for p in out.rglob("part-*"))
    done_id = outputs(out)[0][0]["id"] if outputs(out)[0] else outputs(out)[1][0]["id"]
    changed = [dict(p, prompt="add: 1 2 3 4 + 4 3 2 1") if p["id"] == done_id else p for p in prompts]
    shutil.rmtree(tmp_path / "prompts")
    records.write_rows(changed, tmp_path / "prompts", "jsonl")
    with pytest.raises(ConfigError, match=f"clair.prompts: the prompt or reference under id '{done_id}' "
                                          "differs from the one its pairs in .* were made from"):
        run_clair(config)
    assert sorted(p.name for p in out.rglob("part-*")) == files
    # A new prompt id added to the file is sent with the units the kill left unwritten, and
    # nothing else (clair.limit and --limit in a real run: test_onpolicy_judge_with_the_verifier
    # and test_stronger_preferred_with_the_verifier).
    added = addition_prompts(1, seed=77)[0]
    assert added["id"] not in {p["id"] for p in prompts}
    shutil.rmtree(tmp_path / "prompts")
    records.write_rows([*prompts, added], tmp_path / "prompts", "jsonl")
    summary = run_clair(config)
    assert summary["this_run"]["pairs"] + summary["this_run"]["rejects"] == len(prompts) + 1 - before
    prompts.append(added)
    pairs, rejects = assert_exactly_once(out, [p["id"] for p in prompts])
    reference = {p["id"]: p["reference"] for p in prompts}
    for pair in pairs:
        assert pair["chosen"] == reference[pair["id"]]
        assert not verifier.is_correct(pair["rejected"], reference[pair["id"]])
        assert pair["rejected"].strip() and set(pair["rejected"].split()) <= set("0123456789")
        assert (pair["source"], pair["reviser"]) == ("clair", "verifier")
        assert pair["jaccard"] == pytest.approx(contrast.jaccard(pair["chosen"], pair["rejected"]))
        assert pair["levenshtein"] == contrast.levenshtein(pair["chosen"], pair["rejected"])
    reasons = {r["id"]: r["reason"] for r in rejects}
    assert reasons.pop("too-long") == "generation_failed"
    for reject in rejects:
        if reject["reason"] == "already_correct":
            assert reject["answer"] == reference[reject["id"]]
    assert set(reasons.values()) <= {"already_correct", "answer_too_long"}
    assert pairs, "a partly trained student makes near misses"

    saved = json.loads((out / "manifest.json").read_text())  # written last, keyed by the shaping settings
    assert (saved["stage"], saved["key"]) == ("clair", fingerprint(shaping_fields(config)))
    assert saved["pairs"] == len(pairs) == summary["pairs"]
    assert saved["rejects"] == len(rejects)
    assert sum(saved["rejects_by_reason"].values()) == len(rejects)
    assert saved["contrast"]["jaccard"]["count"] == len(pairs)
    assert saved["contrast"]["jaccard"]["mean"] == pytest.approx(sum(p["jaccard"] for p in pairs) / len(pairs))
    assert (out / "contrast.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    files = sorted(p.name for p in out.rglob("part-*"))
    again = run_clair(config)
    assert again["this_run"]["pairs"] == again["this_run"]["rejects"] == 0
    assert sorted(p.name for p in out.rglob("part-*")) == files

    # Into the same output, other settings that shape the pairs are refused by key, before Ray is
    # touched and even in a dry run; a dry run with the same settings records nothing.
    record = (out / "stage.json").read_text()
    assert json.loads(record)["clair.sampling.temperature"] == 1.0
    for dry_run in (True, False):
        with pytest.raises(ConfigError, match=r"other settings: clair.sampling.temperature \(1.0 -> 0.5\)\. "):
            run_clair(load_config(path, ["clair.sampling.temperature=0.5"]), dry_run=dry_run)
    assert (out / "stage.json").read_text() == record
    # Settings that only pace the run may change.
    assert run_clair(load_config(path, ["clair.commit_seconds=5"]), dry_run=True)["units"] == 0


def test_vllm_reviser_with_structured_output(tmp_path, student, tiny_model, ray_session):
    prompts = addition_prompts(8, seed=11)
    reviser = {"backend": "vllm", "model": str(tiny_model), "structured_output": True, "structured_max_chars": 24,
               "max_tokens": 96, "engine": {**ENGINE, "max_model_len": 1024}}
    _, config = setup_run(tmp_path, student, ray_session, prompts, reviser=reviser)
    run_clair(config)
    pairs, rejects = assert_exactly_once(tmp_path / "run" / "clair", [p["id"] for p in prompts])
    assert pairs, "a random reviser's constrained revision differs from the answer"
    for pair in pairs:
        assert pair["reviser"] == f"vllm:{tiny_model}"
    allowed = {"identical", "empty_revision", "answer_too_long", "revision_too_long"}
    assert {r["reason"] for r in rejects} <= allowed
    # Each pair's chosen is exactly the revision field of the reviser's JSON output.
    for pair in pairs:
        assert json.loads(pair["metadata"]["reviser_output"])["revision"].strip() == pair["chosen"]


def fault_plan(always_fail):
    faults = ["429", "500", "timeout", "garbage", "disconnect"]
    first_tries = {}

    def plan(body, attempt):
        text = body.decode()
        if any(question in text for question in always_fail):
            return "500"
        # The first try of every request fails, each fault in turn; the retry goes through.
        if attempt == 1:
            first_tries.setdefault(body, len(first_tries))
            return faults[first_tries[body] % len(faults)]
        return None
    return plan


def test_openai_reviser_survives_a_flaky_endpoint_and_a_token_budget(tmp_path, student, ray_session,
                                                                     openai_server, capfd):
    prompts = addition_prompts(16, seed=21)
    always_fail = {p["id"]: p["prompt"] for p in prompts[:2]}
    proxy = FaultProxy(openai_server["base_url"].removesuffix("/v1"), fault_plan(set(always_fail.values())),
                       delay_s=3.0)
    base_url = proxy.start()
    reviser = {"backend": "openai", "base_url": base_url, "model": "tiny", "api_key_env": "RAYALIGN_TEST_KEY",
               "structured_output": True, "structured_max_chars": 24, "max_tokens": 96, "timeout_s": 1.5,
               "max_retries": 3, "max_concurrency": 4}
    _, config = setup_run(tmp_path, student, ray_session, prompts, reviser=reviser, max_total_tokens=3000)
    first = run_clair(config)
    out = tmp_path / "run" / "clair"
    written = sum(len(part) for part in outputs(out))
    assert first["this_run"]["deferred"] > 0, "the budget stops the run before every unit is sent"
    assert written + first["this_run"]["deferred"] == len(prompts)

    config.clair.max_total_tokens = None
    run_clair(config)
    proxy.stop()
    pairs, rejects = assert_exactly_once(out, [p["id"] for p in prompts])
    failed = {r["id"]: r["detail"] for r in rejects if r["reason"] == "request_failed"}
    assert failed == {uid: "HTTP 500 from the endpoint (after 4 attempts)" for uid in always_fail}
    assert pairs
    assert set(proxy.faults) == {"429", "500", "timeout", "garbage", "disconnect"}
    assert proxy.authorizations == {f"Bearer {SERVER_KEY}"}
    # The key reached the endpoint but never the outputs or the logs.
    captured = capfd.readouterr()
    assert SERVER_KEY not in captured.out + captured.err
    for path in out.rglob("*"):
        if path.is_file():
            assert SERVER_KEY.encode() not in path.read_bytes(), path


def test_onpolicy_judge_with_an_llm_judge(tmp_path, student, ray_session, openai_server):
    prompts = addition_prompts(6, seed=31)
    reviser = {"backend": "openai", "base_url": openai_server["base_url"], "model": "tiny",
               "api_key_env": "RAYALIGN_TEST_KEY", "structured_output": True, "structured_max_chars": 16,
               "max_tokens": 64}
    _, config = setup_run(tmp_path, student, ray_session, prompts, mode="onpolicy_judge",
                          sampling={"n": 2}, reviser=reviser)
    run_clair(config)
    pairs, rejects = assert_exactly_once(tmp_path / "run" / "clair", [p["id"] for p in prompts])
    for pair in pairs:
        assert pair["source"] == "onpolicy_judge"
        assert pair["chosen"] != pair["rejected"]
        assert json.loads(pair["metadata"]["reviser_output"])["verdict"] in {"A", "B"}
    for reject in rejects:
        assert reject["reason"] in {"tie", "identical", "answer_too_long"}
        if reject["reason"] == "tie":
            assert reject["detail"].startswith("verdicts ")


def test_onpolicy_judge_with_the_verifier(tmp_path, student, ray_session):
    prompts = addition_prompts(12, seed=41)
    # clair.limit caps the units a run attempts, in file order: in judge mode a unit is a prompt.
    _, config = setup_run(tmp_path, student, ray_session, prompts, mode="onpolicy_judge", sampling={"n": 2},
                          limit=10)
    summary = run_clair(config)
    assert summary["this_run"]["pairs"] + summary["this_run"]["rejects"] == 10
    prompts = prompts[:10]
    pairs, rejects = assert_exactly_once(tmp_path / "run" / "clair", [p["id"] for p in prompts])
    # At temperature 1 and top_p 1 the two samples of a prompt differ, for some prompts at least
    # (the control of the top_p test below).
    assert pairs
    reference = {p["id"]: p["reference"] for p in prompts}
    for pair in pairs:
        ref = reference[pair["id"]]
        assert verifier.score(pair["chosen"], ref) > verifier.score(pair["rejected"], ref)
    assert {r["reason"] for r in rejects} <= {"tie", "answer_too_long"}


def test_stronger_preferred_with_the_verifier(tmp_path, student, ray_session):
    prompts = addition_prompts(6, seed=51)
    # clair.sampling.top_p reaches vLLM: at temperature 1, a top_p this small leaves one token to
    # choose from at every step, so the two samples of a prompt (seeds of their own) are the same.
    # --limit (run_clair's limit) overrides clair.limit: all 12 units (6 prompts, 2 samples each).
    _, config = setup_run(tmp_path, student, ray_session, prompts, mode="stronger_preferred",
                          sampling={"n": 2, "top_p": 1e-6}, limit=1)
    summary = run_clair(config, limit=12)
    assert summary["this_run"]["pairs"] + summary["this_run"]["rejects"] == 12
    pairs, rejects = assert_exactly_once(tmp_path / "run" / "clair", [f"{p['id']}#{k}" for p in prompts for k in (0, 1)])
    reference = {p["id"]: p["reference"] for p in prompts}
    assert all(p["chosen"] == reference[p["metadata"]["prompt_id"]] and p["source"] == "stronger_preferred"
               for p in pairs)
    assert all(r["reason"] in {"identical", "answer_too_long"} for r in rejects)
    answers = {}
    for p in pairs:
        answers.setdefault(p["metadata"]["prompt_id"], []).append(("pair", p["rejected"]))
    for r in rejects:
        answers.setdefault(r["prompt_id"], []).append((r["reason"], r["answer"]))
    assert sorted(answers) == sorted(reference)
    assert all(len(both) == 2 and both[0] == both[1] for both in answers.values()), answers


def test_dry_run_estimates_without_sending(tmp_path, student, ray_session):
    from rayalign.clair.revision import revision_request

    prompts = addition_prompts(5, seed=61)
    reviser = {"backend": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "gpt-4-turbo",
               "api_key_env": "RAYALIGN_TEST_KEY", "max_tokens": 100, "price_per_million_input_tokens": 10.0,
               "price_per_million_output_tokens": 30.0}
    _, config = setup_run(tmp_path, student, ray_session, prompts, reviser=reviser, sampling={"max_tokens": 8})
    result = run_clair(config, dry_run=True)
    stub = "x" * 32  # 8 answer tokens at 4 characters each
    expected_in = sum(len(revision_request(p["prompt"], stub)) // 4 + 1 for p in prompts)
    assert result == {"dry_run": True, "units": 5, "reviser_requests": 5, "target_generated_tokens_max": 40,
                      "reviser_input_tokens_max": expected_in, "reviser_output_tokens_max": 500,
                      "estimated_cost": round((expected_in * 10 + 500 * 30) / 1e6, 4)}
    assert not (tmp_path / "run" / "clair" / "pairs").exists()
    # clair.limit caps the units a run attempts; --limit (run_clair's limit) overrides it.
    (tmp_path / "limited").mkdir()
    _, limited = setup_run(tmp_path / "limited", student, ray_session, prompts, reviser=reviser, sampling={"max_tokens": 8},
                           limit=2)
    assert run_clair(limited, dry_run=True)["units"] == 2
    assert run_clair(limited, limit=4, dry_run=True)["units"] == 4


def test_offpolicy_mode_imports_judged_pairs(tmp_path, ray_session, student):
    src = tmp_path / "judged.jsonl"
    src.write_text(json.dumps({"prompt": "Say hi", "chosen": "Hi there!", "rejected": "Hi."}) + "\n")
    _, config = setup_run(tmp_path, student, ray_session, [{"id": "unused", "prompt": "x"}], mode="offpolicy")
    config.clair.prompts = str(src)
    summary = run_clair(config)
    (pair,) = outputs(tmp_path / "run" / "clair")[0]
    assert (pair["chosen"], pair["rejected"], pair["source"]) == ("Hi there!", "Hi.", "offpolicy")
    assert pair["jaccard"] == pytest.approx(1 / 4)  # {Hi} shared of {Hi, there, !, .}
    assert pair["levenshtein"] == 7
    assert summary["pairs"] == 1
