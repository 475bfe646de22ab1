"""What only a real pretrained model can test: SmolLM2-135M-Instruct (a BPE tokenizer of its
own, a chat template that adds a default system prompt, eos `<|im_end|>` that is also its pad
token, tied embeddings, grouped-query attention) from generation through training to serving.

One copy of the model is served for the module by `rayalign serve` as a user runs it (a command
with its own Ray, HAProxy and vLLM engine, behind an API key); it answers the questions, returns
its token ids and scores completions. The same command is then tested as a deployment (one model
as its own ingress, the key, bad requests, the Serve config it writes) and, last, stopped with
SIGTERM. The trained and exported model is tested in test_real_model_export.py.

Log-probs are compared within 1e-4 nats per completion token. All three computations are fp32
but sum in different orders (vLLM's CPU attention and GEMMs, transformers' batched SDPA with
padding, a single unpadded forward), so each token's log-prob differs by float rounding through
30 layers; measured here: at most 3e-5 per token, 1.2e-3 on a 64-token answer.
"""

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import psutil
import pytest
import torch
import yaml

from rayalign import events
from rayalign.clair import stages, verifier
from rayalign.clair.outcomes import pair_row
from rayalign.cluster import DRAIN, engine_core_split
from rayalign.config import load_config
from rayalign.questions import question_prompts
from rayalign.records import prompt_messages, question_text
from rayalign.serve import ONE_MODEL_BUILDER, app_args, build_app
from rayalign.train.data import encode_pair, encode_prompt
from tests.conftest import PYTHON, SERVER_KEY, free_port, kill_command
from tests.serve_fixtures import KEY_ENV, bad_requests, check_key_required, check_refused_then_served

pytestmark = pytest.mark.integration

RAYALIGN = str(Path(PYTHON).with_name("rayalign"))
ENGINE = {"dtype": "auto", "max_model_len": 512, "gpu_memory_utilization": 0.3, "engine_args": {"enforce_eager": True}}
# The served copy runs in float32 whatever the CPU, so that its log-probs compare with training's
# within float rounding; on a CPU with native bf16, `auto` would choose bfloat16 (measured here:
# up to 0.018 nats per token from transformers in bf16, 0.015 from fp32).
SERVED_ENGINE = {**ENGINE, "dtype": "float32"}
QUESTIONS = question_prompts(20, "eval", seed=3)
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
PER_TOKEN = 1e-4


@pytest.fixture(scope="module")
def tokenizer(smollm2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2)


@pytest.fixture(scope="module")
def served_smollm2(smollm2, tmp_path_factory):
    """`rayalign serve --model smollm2=DIR` as a user runs it in a terminal: a command in its own
    process group with its own Ray, HAProxy and vLLM engine, behind the API key in KEY_ENV, until
    the module's last test stops it with SIGTERM (or the module ends)."""
    run = tmp_path_factory.mktemp("smollm2_serve")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own Ray, not the session's
    overrides = [f"run_dir={run}", f"serve.port={port}", "serve.ready_timeout_s=600", "cluster.num_cpus=6",
                 f"serve.api_key_env={KEY_ENV}", f"serve.engine={json.dumps(SERVED_ENGINE)}"]
    log = run / "serve.log"
    started = time.time()
    with open(log, "w") as out:
        proc = subprocess.Popen([RAYALIGN, "serve", "--model", f"smollm2={smollm2}", *overrides], stdout=out,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}/v1"
    deadline = time.time() + 700
    while f"serving smollm2 at {base_url} (Ctrl-C to stop" not in log.read_text():
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(2)
    tree = psutil.Process(proc.pid).children(recursive=True)
    client = openai.OpenAI(base_url=base_url, api_key=SERVER_KEY, max_retries=2, timeout=300)
    yield {"base_url": base_url, "url": base_url.removesuffix("/v1"), "client": client, "log": log,
           "started": started, "proc": proc, "tree": tree, "run": run, "source": str(smollm2),
           "config": load_config(None, overrides)}
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(180)
    finally:
        kill_command(proc, tree)


@pytest.fixture(scope="module")
def answers(served_smollm2, tokenizer):
    """The served model's greedy answer to each question, with the prompt's and the answer's ids."""
    def ask(row: dict) -> dict:
        reply = served_smollm2["client"].chat.completions.create(
            model="smollm2", messages=prompt_messages(row), temperature=0.0, max_tokens=48,
            extra_body={"return_token_ids": True})
        choice = reply.choices[0]
        return {"row": row, "text": choice.message.content, "finish": choice.finish_reason,
                "prompt_ids": reply.prompt_token_ids, "token_ids": choice.token_ids}

    with ThreadPoolExecutor(8) as pool:  # concurrent requests, batched by the engine
        return list(pool.map(ask, QUESTIONS))


def verifier_revised(answer: dict) -> dict:
    """The CLAIR stage's row for one served answer, after the verifier (as Ray Data would carry it)."""
    unit = {"unit_id": answer["row"]["id"], "prompt_id": answer["row"]["id"], "sample": 0, "seed": 0,
            "prompt_json": json.dumps(answer["row"]["prompt"]), "reference": answer["row"]["reference"],
            "answer_text": answer["text"], "answer_token_ids": answer["token_ids"],
            "answer_tokens": len(answer["token_ids"]), "answer_truncated": answer["finish"] == "length",
            "answer_error": ""}
    return stages.verifier_revise(stages.answer_outcome(unit), None)


def engines_since(model, started: float) -> list[dict]:
    """The vLLM engines of `model` that started since `started`, as they recorded themselves."""
    return [e for e in events.read(os.environ[events.ENV])
            if e["kind"] == "engine" and e["model"] == str(model) and e["time"] >= started]


def test_the_served_engine_runs_in_the_configured_dtype(served_smollm2, smollm2):
    assert [e["dtype"] for e in engines_since(smollm2, served_smollm2["started"])] == ["float32"]
    assert "engine dtype auto" not in served_smollm2["log"].read_text()


def test_system_messages_and_the_template_default_survive_to_training_and_serving(answers, tokenizer):
    with_system = [a for a in answers if a["row"]["prompt"][0]["role"] == "system"]
    without = [a for a in answers if a["row"]["prompt"][0]["role"] != "system"]
    assert with_system and without
    for a in answers:
        # What the server fed the model is what training feeds it.
        assert a["prompt_ids"] == encode_prompt(tokenizer, a["row"]["prompt"])
        rendered = tokenizer.decode(a["prompt_ids"])
        assert rendered.endswith("<|im_start|>assistant\n")
        if a in with_system:  # the user's system message replaces the template's default
            assert rendered.startswith(f"<|im_start|>system\n{a['row']['prompt'][0]['content']}<|im_end|>\n")
            assert DEFAULT_SYSTEM not in rendered
        else:
            assert rendered.startswith(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n")


def test_eos_is_where_the_template_puts_it(answers, tokenizer):
    eos = tokenizer.eos_token_id
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|im_end|>")
    stopped = [a for a in answers if a["finish"] == "stop"]
    assert len(stopped) >= 10
    for a in stopped:
        row = {"id": "x", "prompt": a["row"]["prompt"], "chosen": a["text"], "rejected": a["text"] + " No.",
               "metadata": {"chosen_token_ids": a["token_ids"]}}
        enc = encode_pair(tokenizer, row, max_length=512, max_prompt_length=256)
        # The engine stopped on eos; training scores the same tokens, eos last ...
        assert a["token_ids"][-1] == eos and enc.chosen_ids == a["token_ids"]
        # ... and the template closes the assistant's turn with exactly that eos.
        messages = prompt_messages(a["row"]) + [{"role": "assistant", "content": a["text"]}]
        conversation = tokenizer.apply_chat_template(messages, tokenize=True)
        conversation = list(conversation["input_ids"] if hasattr(conversation, "keys") else conversation)
        sequence = enc.prompt_ids + enc.chosen_ids
        if tokenizer(a["text"], add_special_tokens=False).input_ids == a["token_ids"][:-1]:
            assert conversation[:len(sequence)] == sequence
            assert tokenizer.decode(conversation[len(sequence):]) == "\n"


def test_training_scores_the_tokens_the_model_generated(answers, tokenizer):
    """A CLAIR pair keeps the ids of the target's answer, and the trainer scores exactly those."""
    pairs = 0
    for a in answers:
        row = verifier_revised(a)
        if row["outcome"] != "pair":
            continue
        pairs += 1
        pair = pair_row(row, row["chosen"], row["rejected"], "clair", "verifier")
        assert pair["metadata"]["rejected_token_ids"] == a["token_ids"]
        enc = encode_pair(tokenizer, pair, max_length=512, max_prompt_length=256)
        assert enc.rejected_ids == a["token_ids"] and enc.prompt_ids == a["prompt_ids"]
        # The revision is minimal: the reference replaced the wrong answer, the rest is the answer's.
        question = question_text(a["row"])
        assert verifier.is_correct(pair["chosen"][0]["content"], a["row"]["reference"], question=question)
        assert pair["levenshtein"] <= len(a["row"]["reference"]) + 40
    assert pairs >= 3, "SmolLM2 gets some of these questions wrong"


def test_summed_log_probs_agree_between_training_transformers_and_vllm(answers, served_smollm2, smollm2, tokenizer):
    from rayalign.train.engine import load_model
    from rayalign.train.forward import pair_logps

    model = load_model(str(smollm2), "fp32", trainable=False)
    scored = [a for a in answers if a["finish"] == "stop"][:12]
    served_logps = []
    for a in scored:
        reply = served_smollm2["client"].completions.create(
            model="smollm2", prompt=a["prompt_ids"] + a["token_ids"], max_tokens=1, temperature=0.0,
            extra_body={"prompt_logprobs": 0})
        positions = reply.choices[0].prompt_logprobs[len(a["prompt_ids"]):]
        served_logps.append(sum(p[str(t)]["logprob"] for p, t in zip(positions, a["token_ids"])))
    batch = [{"prompt_ids": a["prompt_ids"], "chosen_ids": a["token_ids"], "rejected_ids": a["token_ids"]}
             for a in scored]
    with torch.no_grad():
        trained = pair_logps(model, batch, tokenizer.pad_token_id)["chosen"].tolist()
        plain = []
        for a in scored:
            ids = torch.tensor([a["prompt_ids"] + a["token_ids"]])
            logits = model(ids).logits[0, len(a["prompt_ids"]) - 1:-1].double()
            plain.append(torch.log_softmax(logits, -1).gather(-1, torch.tensor(a["token_ids"])[:, None]).sum().item())
    for a, t, p, v in zip(scored, trained, plain, served_logps):
        bound = PER_TOKEN * len(a["token_ids"])
        assert abs(t - p) <= bound and abs(v - p) <= bound and abs(t - v) <= bound, (len(a["token_ids"]), t, p, v)


def test_clair_on_the_real_model_with_the_served_model_as_an_openai_reviser(served_smollm2, smollm2, ray_session, tmp_path,
                                                                          tokenizer):
    """The API path end to end: the target answers on Ray Data + vLLM, the served model revises
    over HTTP in JSON (structured output), so every revision parses."""
    from rayalign.clair.pipeline import run_clair
    from rayalign.config import load_config
    from rayalign.records import load_pairs, read_records, write_rows

    prompts = question_prompts(4, "train", seed=5)
    write_rows(prompts, tmp_path / "prompts", "jsonl")
    reviser = {"backend": "openai", "base_url": served_smollm2["base_url"], "model": "smollm2",
               "api_key_env": "RAYALIGN_TEST_KEY", "structured_output": True, "structured_max_chars": 160,
               "max_tokens": 200, "temperature": 0.0, "max_concurrency": 4}
    config = load_config(None, [
        f"run_dir={tmp_path / 'run'}", f"cluster.address={ray_session.get_runtime_context().gcs_address}",
        f"clair.prompts={tmp_path / 'prompts'}", f"clair.target_model={smollm2}",
        "clair.sampling={temperature: 0.7, max_tokens: 64, n: 1, seed: 0}",
        f"clair.engine={json.dumps(ENGINE)}", f"clair.reviser={json.dumps(reviser)}"])
    started = time.time()
    run_clair(config)
    # The target's engine (in a Ray Data actor) ran in the dtype `auto` chose for this CPU.
    from rayalign.train.engine import cpu_has_bf16

    expected = "bfloat16" if cpu_has_bf16() else "float32"
    assert [e["dtype"] for e in engines_since(smollm2, started)] == [expected]
    out = tmp_path / "run" / "clair"
    pairs = load_pairs(out / "pairs") if (out / "pairs").exists() else []
    rejects = [r.value for r in read_records(out / "rejects")] if (out / "rejects").exists() else []
    assert sorted([p["id"] for p in pairs] + [r["id"] for r in rejects]) == sorted(p["id"] for p in prompts)
    assert {r["reason"] for r in rejects} <= {"identical", "empty_revision", "answer_too_long", "revision_too_long"}
    for pair in pairs:
        assert pair["reviser"] == "openai:smollm2"
        # The target's answer is the text of the token ids it generated, special tokens skipped.
        ids = pair["metadata"]["rejected_token_ids"]
        assert pair["rejected"][0]["content"] == tokenizer.decode(ids, skip_special_tokens=True)
        assert json.loads(pair["metadata"]["reviser_output"])["revision"].strip() == pair["chosen"][0]["content"]


# The served command as a deployment: one model as its own ingress (`rayalign.serve:build_app`),
# behind the key, refusing bad requests, and the Serve config it wrote. Then, last in the module,
# SIGTERM stops it and its Ray. (Its Ray is its own: the checks below read its processes and logs.)

def replicas(served: dict) -> list[psutil.Process]:
    """The command's Serve replicas, by the process title Ray gives them."""
    title = f"ServeReplica:{served['config'].serve.app_name}:"
    return [p for p in served["tree"] if p.is_running() and title in " ".join(p.cmdline())]


def test_one_model_is_its_own_ingress_and_answers_the_openai_api(served_smollm2):
    # One replica, the model's own deployment: no ingress deployment in front of it.
    titles = [" ".join(p.cmdline()) for p in replicas(served_smollm2)]
    app = served_smollm2["config"].serve.app_name
    assert len(titles) == 1 and titles[0].startswith(f"ray::ServeReplica:{app}:LLMServer:smollm2"), titles
    c = served_smollm2["client"]
    assert [m.id for m in c.models.list().data] == ["smollm2"]
    ask = [{"role": "user", "content": "What is the capital of France?"}]
    chat = c.chat.completions.create(model="smollm2", messages=ask, max_tokens=8, temperature=0)
    text = chat.choices[0].message.content
    assert chat.model == "smollm2" and chat.usage.completion_tokens >= 1 and text
    stream = c.chat.completions.create(model="smollm2", messages=ask, max_tokens=8, temperature=0, stream=True)
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert len(pieces) >= 2 and "".join(pieces) == text, "streamed greedy answer = plain greedy answer"
    completion = c.completions.create(model="smollm2", prompt="hello world", max_tokens=6, temperature=0)
    assert completion.choices[0].text and completion.usage.prompt_tokens >= 2
    forced = c.chat.completions.create(model="smollm2", messages=ask, max_tokens=4, temperature=0.0,
                                       extra_body={"min_tokens": 4})
    assert forced.usage.completion_tokens == 4


def test_the_replica_drains_for_2_s_behind_haproxy_on_the_serve_port(served_smollm2):
    """On a Ray that rayalign starts, Serve's HTTP ingress is HAProxy, not the Python proxy actor,
    and a replica drains for 2 s, not for Serve's 30 s meant for outside load balancers."""
    assert {p.environ().get(DRAIN) for p in replicas(served_smollm2)} == {"2"}
    port = served_smollm2["config"].serve.port
    owners = {psutil.Process(c.pid).name() for c in psutil.net_connections("tcp")
              if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid}
    assert owners == {"haproxy"}


def test_one_model_requires_the_key_and_never_logs_it(served_smollm2):
    check_key_required(served_smollm2, "smollm2")
    # Not in the command's console, the Ray logs it keeps in its run directory, or its outputs.
    run = served_smollm2["run"]
    assert (run / "logs").is_symlink()
    files = [p for folder in (run, (run / "logs").resolve()) for p in folder.rglob("*") if p.is_file()]
    assert len([p for p in files if p.suffix in (".log", ".out", ".err")]) > 10
    assert [p.name for p in files if SERVER_KEY.encode() in p.read_bytes()] == []


BAD_REQUESTS = bad_requests("smollm2", unknown_model_message="The model `nope` does not exist")


@pytest.mark.parametrize("name,path,body,raw,status,message", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_one_model_bad_request_gets_a_4xx_and_it_keeps_serving(served_smollm2, name, path, body, raw, status, message):
    check_refused_then_served(served_smollm2, "smollm2", path, body, raw, status, message)


def test_the_written_serve_config_deploys_the_same_app(served_smollm2):
    from ray.serve.schema import ServeDeploySchema

    config = served_smollm2["config"]
    config_file = served_smollm2["run"] / "serve" / "serve_config.yaml"
    assert f"Serve config written to {config_file}" in served_smollm2["log"].read_text()
    text = config_file.read_text()
    assert SERVER_KEY not in text and KEY_ENV in text
    (app,) = ServeDeploySchema.model_validate(yaml.safe_load(text)).applications
    assert app.import_path == ONE_MODEL_BUILDER and app.name == config.serve.app_name
    assert app.args == app_args(config.serve, {"smollm2": served_smollm2["source"]})
    assert app.args["llm_config"]["model_loading_config"] == {"model_id": "smollm2",
                                                              "model_source": str(Path(served_smollm2["source"]).resolve())}
    assert app.args["api_key_env"] == KEY_ENV
    assert build_app(app.args) is not None  # the keyed server class imports by its path


def thread_cpus(processes: list[psutil.Process]) -> set[frozenset[int]]:
    """The distinct CPU sets that the threads of `processes` may run on."""
    found = set()
    for process in processes:
        try:
            threads = process.threads()
        except psutil.NoSuchProcess:
            continue
        for thread in threads:
            try:
                found.add(frozenset(os.sched_getaffinity(thread.id)))
            except OSError:  # ended meanwhile
                pass
    return found


def test_the_serve_command_keeps_its_model_worker_apart_then_stops_its_ray_on_sigterm(served_smollm2):
    """Last in the module: it stops the served command."""
    proc, tree, log = served_smollm2["proc"], served_smollm2["tree"], served_smollm2["log"]
    # Everything this command started: its Ray (GCS, raylet, workers), the engine, HAProxy.
    assert "haproxy" in {p.name() for p in tree}
    assert any(p.name() == "raylet" for p in tree)

    # The model worker has its CPUs to itself; every other thread of the command runs elsewhere.
    split = engine_core_split()
    if split is None:  # a one-CPU machine: nothing to keep apart
        assert "model workers on CPUs" not in log.read_text()
    else:
        engine, rest = split
        assert f"vLLM's model workers on CPUs {engine}, Ray's processes on {rest}" in log.read_text()
        workers = [p for p in tree if p.name() == "VLLM::Worker"]
        assert len(workers) == 1
        assert thread_cpus(workers) == {frozenset(engine)}
        others = [psutil.Process(proc.pid)] + [p for p in tree if p not in workers]
        assert thread_cpus(others) == {frozenset(rest)}

    proc.send_signal(signal.SIGTERM)  # what `kill` sends; Ctrl-C takes the same path
    stopped = time.time()
    assert proc.wait(180) == 0, log.read_text()[-3000:]
    seconds = time.time() - stopped
    text = log.read_text()
    # Its own Ray goes with everything in it, without Serve's half-minute drain.
    assert "stopping: 'rayalign' stops with the Ray this command started" in text
    assert "rayalign serve: stopped serving smollm2" in text and "Traceback" not in text
    gone, alive = psutil.wait_procs(tree, timeout=60)
    assert not alive, [f"{p.pid} {p.name()}" for p in alive]
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{served_smollm2['base_url']}/models", timeout=5)
    assert seconds < 25, f"stopping took {seconds:.0f} s"
