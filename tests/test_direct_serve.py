"""One model served on real Ray Serve over HTTP: its LLMServer deployment is the ingress itself
(`rayalign.serve:build_app`), with the API key, bad requests and the written Serve config.

Serve routes one application per prefix, and this one, like the shared two-model deployment of
test_serve.py and test_eval.py, is served at "/". The two never meet, in whatever order the modules
run: this module shuts its application down when it ends, and the shared one stops after its last
user, those two modules running one after the other (tests/conftest.py, SHARED_ENGINES)."""

from pathlib import Path

import psutil
import pytest
import yaml

from rayalign.cluster import DRAIN
from rayalign.serve import ONE_MODEL_BUILDER, app_args, build_app, serve_shutdown, serve_status
from tests.conftest import SERVER_KEY, free_port
from tests.serve_fixtures import (ADD, ENGINE, KEY_ENV, bad_requests, check_key_required,
                                   check_refused_then_served, client, leaked_key_files)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def solo(tiny_model, ray_session, tmp_path_factory):
    from rayalign.config import load_config
    from rayalign.serve import serve_models

    run = tmp_path_factory.mktemp("solo_run")
    port = free_port()
    raw = {"run_dir": str(run), "cluster": {"address": ray_session.get_runtime_context().gcs_address},
           "serve": {"port": port, "api_key_env": KEY_ENV, "app_name": f"rayalign-solo-{port}",
                     "ready_timeout_s": 500, "engine": ENGINE}}
    (run / "run.yaml").write_text(yaml.safe_dump(raw))
    config = load_config(run / "run.yaml")
    info = serve_models(config, {"solo": str(tiny_model)}, detach=True)
    yield {**info, "config": config, "source": str(tiny_model)}
    serve_shutdown(config)
    # Removed, its replica drained for the 2 s that rayalign gives a Ray it starts (the session's
    # Ray here, tests/conftest.py), not for Serve's 30 s meant for outside load balancers.
    logs = Path(ray_session._private.worker._global_node.get_session_dir_path()) / "logs" / "serve"
    lines = [line for p in logs.glob("controller_*.log") for line in p.read_text().splitlines()
             if f"deployment='LLMServer:solo', app='{config.serve.app_name}'" in line]
    stopping = [stamp(line) for line in lines if "-- Stopping Replica" in line]
    stopped = [stamp(line) for line in lines if line.endswith("is stopped.")]
    assert len(stopping) == len(stopped) == 1, lines
    assert stopped[0] - stopping[0] < 20, lines


def stamp(line: str) -> float:
    """The time of a Serve log line ("INFO 2026-12-04 18:51:12,509 controller ...")."""
    from datetime import datetime

    return datetime.strptime(" ".join(line.split()[1:3]), "%Y-%m-%d %H:%M:%S,%f").timestamp()


def test_one_model_is_its_own_ingress_and_answers_the_openai_api(solo):
    deployments = serve_status(solo["config"])["deployments"]
    assert {name: d["replicas"] for name, d in deployments.items()} == {"LLMServer:solo": {"RUNNING": 1}}

    c = client(solo)
    assert [m.id for m in c.models.list().data] == ["solo"]
    chat = c.chat.completions.create(model="solo", messages=ADD, max_tokens=8, temperature=0)
    text = chat.choices[0].message.content
    assert chat.model == "solo" and chat.usage.completion_tokens >= 1 and text
    stream = c.chat.completions.create(model="solo", messages=ADD, max_tokens=8, temperature=0, stream=True)
    pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
    assert len(pieces) >= 2 and "".join(pieces) == text, "streamed greedy answer = plain greedy answer"
    completion = c.completions.create(model="solo", prompt="hello world", max_tokens=6, temperature=0)
    assert completion.choices[0].text and completion.usage.prompt_tokens >= 2


def test_the_replica_drains_for_2_s_behind_serves_own_haproxy(solo):
    title = f"ServeReplica:{solo['config'].serve.app_name}:"  # the process title Ray gives it
    replicas = [p for p in psutil.process_iter(["cmdline"]) if title in " ".join(p.info["cmdline"] or [])]
    assert replicas and {p.environ().get(DRAIN) for p in replicas} == {"2"}


def test_haproxy_holds_the_serve_port(solo):
    """Serve's HTTP ingress on a Ray that rayalign starts (as the session's Ray here) is HAProxy,
    not the Python proxy actor."""
    port = solo["config"].serve.port
    owners = {psutil.Process(c.pid).name() for c in psutil.net_connections("tcp")
              if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid}
    assert owners == {"haproxy"}


def test_one_model_requires_the_key_and_never_logs_it(solo, ray_session):
    check_key_required(solo, "solo")
    assert leaked_key_files(ray_session) == []


BAD_REQUESTS = bad_requests("solo", unknown_model_message="The model `nope` does not exist")


@pytest.mark.parametrize("name,path,body,raw,status,message", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_one_model_bad_request_gets_a_4xx_and_it_keeps_serving(solo, name, path, body, raw, status, message):
    check_refused_then_served(solo, "solo", path, body, raw, status, message)


def test_one_model_written_serve_config_deploys_the_same_app(solo):
    from ray.serve.schema import ServeDeploySchema

    text = Path(solo["config_file"]).read_text()
    assert SERVER_KEY not in text and KEY_ENV in text
    (app,) = ServeDeploySchema.model_validate(yaml.safe_load(text)).applications
    assert app.import_path == ONE_MODEL_BUILDER and app.name == solo["app"]
    assert app.args == app_args(solo["config"].serve, {"solo": solo["source"]})
    assert app.args["llm_config"]["model_loading_config"] == {"model_id": "solo",
                                                              "model_source": str(Path(solo["source"]).resolve())}
    assert app.args["api_key_env"] == KEY_ENV
    assert build_app(app.args) is not None  # the keyed server class imports by its path
