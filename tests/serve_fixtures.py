"""One Ray Serve deployment for the whole session, shared by test_serve.py and test_eval.py:
two checkpoints side by side (`base`: the random tiny model, `aligned`: the student), behind the
API key in RAYALIGN_TEST_KEY. Each engine start costs 30-70 s here, so it is started once, and
it stops after the last test that uses it (tests/conftest.py, SHARED_ENGINES).

Test modules load it with `pytest_plugins = ["tests.serve_fixtures"]`: a session fixture
imported into two modules would be two fixtures, and the deployment would start twice.
"""

import json
import re
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest
import yaml

from tests.conftest import SERVER_KEY, free_port, stop_now, stop_when_unused

KEY_ENV = "RAYALIGN_TEST_KEY"
ADD = [{"role": "user", "content": "add: 1 2 3 + 4 5 6"}]
# No torch.compile warm-up: saves ~20 s per engine start here.
ENGINE = {"dtype": "float32", "max_model_len": 1024, "gpu_memory_utilization": 0.1,
          "engine_args": {"enforce_eager": True}}


@pytest.fixture(scope="session")
def served(tiny_model, student, ray_session, tmp_path_factory):
    from rayalign.config import load_config
    from rayalign.serve import serve_models, serve_shutdown

    run = tmp_path_factory.mktemp("serve_run")
    port = free_port()
    raw = {"run_dir": str(run),
           "cluster": {"address": ray_session.get_runtime_context().gcs_address},
           # A name of its own, so that no other session's Serve app on this machine is touched.
           "serve": {"port": port, "api_key_env": KEY_ENV, "app_name": f"rayalign-test-{port}",
                     "ready_timeout_s": 500, "engine": ENGINE}}
    path = run / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    config = load_config(path)
    models = {"base": str(tiny_model), "aligned": str(student)}
    info = serve_models(config, models, detach=True)

    def stop():
        serve_shutdown(config)
        assert_replicas_stopped_within(ray_session, config.serve.app_name, 20)

    stop_when_unused("served", stop)
    yield {**info, "config": config, "config_path": path, "key": SERVER_KEY, "sources": models}
    stop_now("served")


def assert_replicas_stopped_within(ray_session, app: str, seconds: float) -> None:
    """The removed application's replicas each stopped within `seconds` of being told to: they
    drained for the 2 s that rayalign gives a Ray it starts (the session's Ray here,
    tests/conftest.py), not for Serve's 30 s meant for outside load balancers."""
    logs = Path(ray_session._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
    lines = [line for p in logs.glob("controller_*.log") for line in p.read_text().splitlines()
             if f"app='{app}'" in line]
    replica = re.compile(r"Replica\(id='(\w+)', deployment='([^']+)'")
    stopping = {replica.search(line).groups(): stamp(line) for line in lines if "-- Stopping Replica" in line}
    stopped = {replica.search(line).groups(): stamp(line) for line in lines if line.endswith("is stopped.")}
    assert stopping.keys() == stopped.keys(), lines
    assert {deployment for _, deployment in stopped} >= {"LLMServer:base", "LLMServer:aligned"}, lines
    assert all(stopped[r] - stopping[r] < seconds for r in stopping), lines


def stamp(line: str) -> float:
    """The time of a Serve log line ("INFO 2026-12-04 18:51:12,509 controller ...")."""
    from datetime import datetime

    return datetime.strptime(" ".join(line.split()[1:3]), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def client(served, key=SERVER_KEY):
    return openai.OpenAI(base_url=served["base_url"], api_key=key, max_retries=0, timeout=120)


def http(served, method, path, body=None, key=SERVER_KEY, raw=None):
    """(status, parsed JSON or text) of one request; 4xx/5xx are returned, not raised."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(served["url"] + path, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            status, text = response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


def leaked_key_files(ray_session) -> list[str]:
    """Files under this Ray session's logs that hold the API key (expected: none)."""
    logs = Path(ray_session._private.worker._global_node.get_session_dir_path()) / "logs"
    return [p.name for p in logs.rglob("*") if p.is_file() and SERVER_KEY.encode() in p.read_bytes()]


def check_key_required(served, model: str) -> None:
    """401 with a missing, wrong or extended key, on a GET and a POST route; the key in no answer."""
    for key in (None, "sk-wrong-key", SERVER_KEY + "x"):
        status, body = http(served, "GET", "/v1/models", key=key)
        assert status == 401 and body["error"]["code"] == "invalid_api_key", (key, status, body)
        status, body = http(served, "POST", "/v1/chat/completions", {"model": model, "messages": ADD}, key=key)
        assert status == 401 and SERVER_KEY not in json.dumps(body), (key, status, body)
    with pytest.raises(openai.AuthenticationError):
        client(served, key="sk-wrong-key").chat.completions.create(model=model, messages=ADD, max_tokens=2)


def bad_requests(model: str, unknown_model_message: str) -> list[tuple]:
    """(name, path, JSON body, raw body, expected status, text in the answer) of requests to refuse."""
    return [
        ("malformed JSON", "/v1/chat/completions", None, b'{"model": "%s", "messages": [' % model.encode(), 400, "JSON"),
        ("unknown model", "/v1/chat/completions", {"model": "nope", "messages": ADD}, None, 404, unknown_model_message),
        ("prompt longer than the context", "/v1/completions",
         {"model": model, "prompt": "hello world " * 1500, "max_tokens": 4}, None, 400, "maximum context length"),
        ("negative max_tokens", "/v1/chat/completions",
         {"model": model, "messages": ADD, "max_tokens": -1}, None, 400, "max_tokens"),
        ("missing messages", "/v1/chat/completions", {"model": model}, None, 400, "messages"),
    ]


def check_refused_then_served(served, model, path, body, raw, status, message) -> None:
    """The bad request gets its 4xx and message; the next good request is answered."""
    got, answer = http(served, "POST", path, body, raw=raw)
    assert got == status and message in json.dumps(answer), (got, answer)
    ok = client(served).chat.completions.create(model=model, messages=ADD, max_tokens=3, temperature=0)
    assert ok.choices[0].message.content
