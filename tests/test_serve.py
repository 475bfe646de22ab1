"""Serving on real Ray Serve (ray.serve.llm, vLLM on CPU) over HTTP: two models side by side,
the OpenAI API with streaming, the API key, bad requests, the written Serve config and a
killed replica. One deployment (tests/serve_fixtures.py) serves the whole session."""

import os
import signal
import time
import urllib.request
from pathlib import Path

import openai
import psutil
import pytest
import yaml

from rayalign.config import load_config
from rayalign.serve import BearerKey, ServeError, app_args, parse_models, serve_models, serve_status
from tests.conftest import SERVER_KEY
from tests.serve_fixtures import (ADD, bad_requests, check_key_required, check_refused_then_served, client, http,
                                   leaked_key_files)

integration = pytest.mark.integration
# The shared deployment (`served`), loaded as a plugin so that it starts once per session.
pytest_plugins = ["tests.serve_fixtures"]


# ---- without a deployment --------------------------------------------------------------------

def test_parse_models_and_bad_sources(tmp_path):
    assert parse_models(["base=a/b", "aligned = /x/y "]) == {"base": "a/b", "aligned": "/x/y"}
    for specs, message in ((["base"], "expected NAME=DIR"), (["a=x", "a=y"], "given twice"),
                           (["=dir"], "expected NAME=DIR")):
        with pytest.raises(ServeError, match=message):
            parse_models(specs)
    config = load_config(None, [])
    with pytest.raises(ServeError, match=r"serve.models.m: .*nowhere is neither a checkpoint"):
        app_args(config.serve, {"m": str(tmp_path / "nowhere")})
    with pytest.raises(ServeError, match="has no config.json"):
        app_args(config.serve, {"m": str(tmp_path)})
    with pytest.raises(ServeError, match="no model to serve"):
        app_args(config.serve, {})


def test_detach_without_a_cluster_explains_what_to_do(monkeypatch, tiny_model):
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # as in a fresh `rayalign serve` process
    with pytest.raises(ServeError, match=r"--detach needs a Ray cluster .*ray start --head"):
        serve_models(load_config(None, []), {"base": str(tiny_model)}, detach=True)


def test_bearer_key_middleware_by_itself():
    import asyncio

    calls, sent = [], []

    async def app(scope, receive, send):
        calls.append(scope["path"])

    async def send(message):
        sent.append(message)

    guard = BearerKey(app, "sk-right")
    for header, passes in ((None, False), (b"Bearer sk-wrong", False), (b"Basic sk-right", False),
                           (b"Bearer sk-righ", False), (b"Bearer sk-right", True), (b"bearer sk-right", True)):
        calls.clear(), sent.clear()
        headers = [(b"authorization", header)] if header else []
        asyncio.run(guard({"type": "http", "path": "/v1/models", "headers": headers}, None, send))
        assert calls == (["/v1/models"] if passes else []), header
        if not passes:
            assert sent[0]["status"] == 401 and b"sk-right" not in sent[1]["body"]


# ---- the shared deployment ---------------------------------------------------------------------


@integration
def test_openai_client_chat_completion_stream_and_models(served):
    c = client(served)
    assert sorted(m.id for m in c.models.list().data) == ["aligned", "base"]
    assert urllib.request.urlopen(served["url"] + "/-/healthz", timeout=30).status == 200

    for model in ("aligned", "base"):
        chat = c.chat.completions.create(model=model, messages=ADD, max_tokens=8, temperature=0)
        text = chat.choices[0].message.content
        assert chat.model == model and chat.usage.completion_tokens >= 1 and text
        stream = c.chat.completions.create(model=model, messages=ADD, max_tokens=8, temperature=0, stream=True)
        pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
        assert len(pieces) >= 2 and "".join(pieces) == text, "streamed greedy answer = plain greedy answer"

    # The student's word-level vocabulary holds only digits and the task's words.
    answer = c.chat.completions.create(model="aligned", messages=ADD, max_tokens=8, temperature=0)
    assert set(answer.choices[0].message.content.split()) <= set("0123456789")

    completion = c.completions.create(model="base", prompt="hello world", max_tokens=6, temperature=0)
    assert completion.choices[0].text and completion.usage.prompt_tokens >= 2
    stream = c.completions.create(model="base", prompt="hello world", max_tokens=6, temperature=0, stream=True)
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == completion.choices[0].text
    sampled = c.completions.create(model="base", prompt="hello world", max_tokens=6, temperature=1.0, n=3, seed=1)
    assert len(sampled.choices) == 3 and sorted(ch.index for ch in sampled.choices) == [0, 1, 2]


@integration
def test_api_key_is_required_and_never_logged(served, ray_session):
    check_key_required(served, "base")
    status, body = http(served, "GET", "/v1/models")
    assert status == 200 and sorted(m["id"] for m in body["data"]) == ["aligned", "base"]

    written = Path(served["config_file"]).read_text()
    assert SERVER_KEY not in written and served["api_key_env"] in written
    assert leaked_key_files(ray_session) == []


BAD_REQUESTS = bad_requests("base", unknown_model_message="Could not find base model")


@integration
@pytest.mark.parametrize("name,path,body,raw,status,message", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_request_gets_a_4xx_and_the_server_keeps_serving(served, name, path, body, raw, status, message):
    check_refused_then_served(served, "base", path, body, raw, status, message)


@integration
def test_written_serve_config_deploys_the_same_app(served):
    from ray.serve.llm import LLMServingArgs, build_openai_app
    from ray.serve.schema import ServeDeploySchema

    doc = yaml.safe_load(Path(served["config_file"]).read_text())
    schema = ServeDeploySchema.model_validate(doc)  # what `serve deploy` and KubeRay validate
    (app,) = schema.applications
    assert app.import_path == "ray.serve.llm:build_openai_app" and app.name == served["app"]
    assert doc["http_options"]["port"] == served["config"].serve.port
    args = LLMServingArgs.model_validate(app.args)
    sources = {c.model_id: c.model_loading_config.model_source for c in args.llm_configs}
    assert sources == {name: str(Path(src).resolve()) for name, src in served["sources"].items()}
    assert app.args["ingress_cls_config"] == {"ingress_cls": "rayalign.serve:KeyedIngress",
                                              "ingress_extra_kwargs": {"api_key_env": served["api_key_env"]}}
    assert app.args == app_args(served["config"].serve, served["sources"])
    assert build_openai_app(app.args) is not None  # the ingress class imports by its path


def _replica(app: str, deployment: str) -> psutil.Process:
    """This session's replica process (a descendant of this test process) of one deployment."""
    title = f"ray::ServeReplica:{app}:{deployment}"
    mine = {p.pid for p in psutil.Process().children(recursive=True)}
    # While it runs one of its methods, Ray titles the process "<title>.<method>".
    titles = {p.pid: (p.info["cmdline"] or [""])[0].strip() for p in psutil.process_iter(["pid", "cmdline"])
              if p.pid in mine}
    found = [psutil.Process(pid) for pid, t in titles.items() if t == title or t.startswith(title + ".")]
    assert len(found) == 1, f"expected one {title} process, found {len(found)}: {sorted(titles.values())}"
    return found[0]


@integration
def test_killed_replica_is_replaced_and_serves_again(served):
    status = serve_status(served["config"])
    assert status["status"] == "RUNNING"
    assert {name: d["replicas"] for name, d in status["deployments"].items()} == {
        "LLMServer:base": {"RUNNING": 1}, "LLMServer:aligned": {"RUNNING": 1}, "KeyedIngress": {"RUNNING": 1}}

    victim = _replica(served["app"], "LLMServer:base")
    engine = victim.children(recursive=True)
    os.kill(victim.pid, signal.SIGKILL)
    c = client(served)
    # The other model is a separate replica and keeps answering meanwhile.
    assert c.chat.completions.create(model="aligned", messages=ADD, max_tokens=3).choices[0].message.content
    deadline, answered, errors = time.time() + 300, None, []
    while time.time() < deadline and answered is None:
        try:
            answered = c.chat.completions.create(model="base", messages=ADD, max_tokens=3, temperature=0)
        except openai.APIError as exc:
            errors.append(type(exc).__name__)
            time.sleep(3)
    assert answered is not None, f"no answer from base within 300 s of the kill ({errors[-3:]})"
    replacement = _replica(served["app"], "LLMServer:base")
    assert replacement.pid != victim.pid
    assert serve_status(served["config"])["deployments"]["LLMServer:base"]["replicas"] == {"RUNNING": 1}
    for process in engine:  # the killed replica's engine processes, if vLLM left them behind
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
