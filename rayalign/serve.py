"""Every touch of `ray.serve.llm` lives here: its API moves between Ray releases.

`serve_models` deploys checkpoints as one Serve application of vLLM engines behind an
OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models, streaming), with
Serve's health route /-/healthz:

- several models side by side, each under its own name: `ray.serve.llm:build_openai_app`, an
  ingress deployment that routes each request by its `model` to that model's deployment;
- one model: `build_app` below, the model's deployment is itself the HTTP ingress and serves
  vLLM's own OpenAI app; a request crosses one Python process fewer (the ingress), about
  half of what Ray Serve adds to a request alone on a small CPU machine (BENCHMARKS.md).

The same application arguments are written as a Serve config file (`serve deploy FILE`, or the
`serveConfigV2` of a KubeRay RayService), so a cluster runs exactly what was tested locally.

With `serve.api_key_env` set, every route answers 401 unless the request carries
`Authorization: Bearer <key>` (`BearerKey`, in front of `KeyedIngress` or `KeyedLLMServer`).
Each replica reads the key from its own environment, so the key never appears in a config, a
file or a log: only the variable's name does.
"""

from __future__ import annotations

import contextlib
import functools
import hmac
import json
import os
import re
import signal
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from rayalign.config import RunConfig, ServeConfig
from rayalign.llm import engine_kwargs, placement

BUILDER = "ray.serve.llm:build_openai_app"  # several models behind one ingress
ONE_MODEL_BUILDER = "rayalign.serve:build_app"  # one model as its own ingress
KEYED_INGRESS = "rayalign.serve:KeyedIngress"
# vLLM's CPU build binds its model workers' threads to the CPUs this lists ("auto" by default).
OMP_BIND = "VLLM_CPU_OMP_THREADS_BIND"


class ServeError(RuntimeError):
    """A deployment problem a user can fix; the message says what to do."""


# ---- what to deploy --------------------------------------------------------------------------

def parse_models(specs: list[str]) -> dict[str, str]:
    """`["base=DIR", "aligned=DIR"]` (the CLI's --model flags) -> {"base": DIR, "aligned": DIR}."""
    models: dict[str, str] = {}
    for spec in specs:
        name, sep, source = spec.partition("=")
        name, source = name.strip(), source.strip()
        if not sep or not name or not source:
            raise ServeError(f"--model {spec!r}: expected NAME=DIR, e.g. aligned=runs/x/train/final")
        if name in models:
            raise ServeError(f"--model {spec!r}: the name {name!r} is given twice")
        models[name] = source
    return models


def resolve_source(name: str, source: str) -> str:
    """A local checkpoint as an absolute path (replicas run elsewhere), or a hub/cloud name as is."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        raise ServeError(f"serve.models.{name}: a model name may hold only letters, digits, '.', '_' and '-'")
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ServeError(f"serve.models.{name}: {source} has no config.json; is it a Hugging Face checkpoint?")
        return str(path.resolve())
    if "://" in source or re.fullmatch(r"[\w.-]+/[\w.-]+", source):
        return source
    raise ServeError(f"serve.models.{name}: {source} is neither a checkpoint directory nor a hub name")


def app_args(serve: ServeConfig, models: dict[str, str]) -> dict:
    """The arguments of the application builder (`builder(args)`) as plain data: what is
    deployed and what is written. One model: `{"llm_config", "api_key_env"}` for `build_app`;
    several: `build_openai_app`'s LLMServingArgs."""
    if not models:
        raise ServeError("no model to serve: give --model NAME=DIR or set serve.models")
    llm_configs = [{
        "model_loading_config": {"model_id": name, "model_source": resolve_source(name, source)},
        "engine_kwargs": engine_kwargs(serve.engine),
        # On CPU the engine takes a CPU bundle; without one it waits for a GPU forever.
        "placement_group_config": placement(serve.engine),
        "deployment_config": {
            "autoscaling_config": {"min_replicas": serve.min_replicas, "max_replicas": serve.max_replicas,
                                   "initial_replicas": max(1, serve.min_replicas)},
            "ray_actor_options": {"num_cpus": serve.replica_cpus},
        },
    } for name, source in models.items()]
    if len(llm_configs) == 1:
        return {"llm_config": llm_configs[0], "api_key_env": serve.api_key_env}
    args = {"llm_configs": llm_configs,
            "ingress_deployment_config": {"ray_actor_options": {"num_cpus": serve.ingress_cpus}}}
    if serve.api_key_env:
        args["ingress_cls_config"] = {"ingress_cls": KEYED_INGRESS,
                                      "ingress_extra_kwargs": {"api_key_env": serve.api_key_env}}
    return args


def deploy_file(serve: ServeConfig, args: dict) -> dict:
    """A Serve config (ServeDeploySchema) holding the application."""
    return {
        # A cluster's proxy must listen beyond loopback to be reachable.
        "http_options": {"host": "0.0.0.0", "port": serve.port},
        "applications": [{"name": serve.app_name, "route_prefix": "/", "import_path": builder(args), "args": args}],
    }


def builder(args: dict) -> str:
    """The import path of the application builder that takes `args` (see app_args)."""
    return ONE_MODEL_BUILDER if "llm_config" in args else BUILDER


def build_app(args: dict):
    """Serve application builder for one model (import path ONE_MODEL_BUILDER): the model's
    LLMServer deployment is the HTTP ingress itself and serves vLLM's OpenAI app, so Serve's
    proxy hands each request straight to the replica that runs the engine. Autoscaling,
    replicas and resources are the model's own deployment_config, as with several models."""
    from ray import serve
    from ray.serve.llm import LLMConfig, LLMServer, build_llm_deployment

    key_env = args.get("api_key_env")
    server = _keyed_server() if key_env else LLMServer
    return build_llm_deployment(LLMConfig.model_validate(args["llm_config"]), name_prefix="LLMServer:",
                                bind_kwargs={"api_key_env": key_env} if key_env else None,
                                deployment_cls=serve.ingress()(server))


def write_deploy_file(path: Path, serve: ServeConfig, args: dict) -> Path:
    notes = [
        "Ray Serve config for `serve deploy THIS_FILE` (or the serveConfigV2 of a KubeRay RayService).",
        "Written by `rayalign serve`; it deploys what that command deployed.",
        "model_source paths must be readable on the cluster's nodes (shared storage, or use a hub/s3 name).",
    ]
    if builder(args) == ONE_MODEL_BUILDER or serve.api_key_env:
        notes += ["The application needs rayalign importable on the cluster (e.g. runtime_env pip)."]
    if serve.api_key_env:
        notes += [f"The API key must be in the environment variable {serve.api_key_env} of every node "
                  f"(e.g. from a Kubernetes secret)."]
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(f"# {line}\n" for line in notes) + yaml.safe_dump(deploy_file(serve, args), sort_keys=False)
    path.write_text(text, encoding="utf-8")
    return path


def output_dir(config: RunConfig) -> Path:
    return Path(config.serve.output or Path(config.run_dir) / "serve")


def base_url(serve: ServeConfig) -> str:
    return f"http://{serve.host}:{serve.port}"


# ---- deploying, status, shutdown ---------------------------------------------------------------

def serve_models(config: RunConfig, models: dict[str, str], detach: bool) -> dict:
    """Deploy `models` (name -> checkpoint; default serve.models) and return where they are served.

    With `detach` this returns once the models answer and the application keeps running: on
    the cluster after this process exits, or, when this process already runs its own Ray (a
    pipeline, a test), until that Ray stops. Without, this serves until Ctrl-C or SIGTERM and
    then removes the application."""
    import ray

    serve_cfg = config.serve
    models = models or serve_cfg.models
    address = config.cluster.address or os.environ.get("RAY_ADDRESS")
    if detach and not address and not ray.is_initialized():
        raise ServeError("--detach needs a Ray cluster that outlives this process: start one with "
                         "`ray start --head --num-cpus 8` and set cluster.address=auto (or RAY_ADDRESS=auto)")
    key = _driver_key(serve_cfg)
    args = app_args(serve_cfg, models)
    path = write_deploy_file(output_dir(config) / "serve_config.yaml", serve_cfg, args)

    from ray import serve
    from ray.serve.llm import build_openai_app

    from rayalign.cluster import connect
    from rayalign.console import quiet_ray_console

    quiet_ray_console()  # Serve's console handler, added when ray.serve is imported
    build = build_app if builder(args) == ONE_MODEL_BUILDER else build_openai_app
    owns_ray = not address and not ray.is_initialized()
    with _ray_kept_off_engine_cpus(serve_cfg, owns_ray) as cpus:
        connect(config.cluster, config.run_dir)
        started = time.perf_counter()
        serve.start(http_options={"host": serve_cfg.host, "port": serve_cfg.port})
        _run_with_timeout(serve, build(args), serve_cfg)
        url = base_url(serve_cfg)
        served = _listed_models(url, key, serve_cfg.ready_timeout_s)
        if sorted(served) != sorted(models):
            serve.delete(serve_cfg.app_name)
            raise ServeError(f"{url}/v1/models lists {served}, not {sorted(models)}: Serve may already run on "
                             f"this cluster with other http options (serve.port); run `rayalign serve shutdown` first")
        info = {"app": serve_cfg.app_name, "url": url, "base_url": url + "/v1", "models": dict(models),
                "config_file": str(path), "detached": detach, "api_key_env": serve_cfg.api_key_env,
                "seconds_to_ready": round(time.perf_counter() - started, 1)}
        if cpus:
            info["engine_cpus"], info["ray_cpus"] = cpus
            print(f"rayalign serve: vLLM's model workers on CPUs {cpus[0]}, Ray's processes on {cpus[1]} "
                  f"(serve.isolate_engine_cores)", flush=True)
        if detach:
            return info
        print(f"serving {', '.join(models)} at {info['base_url']} (Ctrl-C to stop; Serve config written to {path})",
              flush=True)
        _serve_until_stopped(serve_cfg.app_name, owns_ray)
        return info


@contextlib.contextmanager
def _ray_kept_off_engine_cpus(serve_cfg: ServeConfig, owns_ray: bool):
    """Around starting a local Ray for CPU engines: yields (the model workers' CPUs, the others),
    or None where it does nothing.

    The workers get the CPUs vLLM binds them to by default, named in OMP_BIND, and this process
    moves to the others, so that Ray's processes, all started from here, inherit them. Otherwise
    Ray's own processes (GCS, raylet and the dashboard at niceness 0, above the engine's 15) and
    the engine's scheduler take turns on the workers' CPUs, and each decoding step waits for
    them: about a tenth of the throughput on two cores (BENCHMARKS.md)."""
    split = _engine_split(serve_cfg) if owns_ray else None
    before = _thread_affinities() if split else {}
    if split:
        try:
            os.sched_setaffinity(0, split[1])  # this thread first: it starts Ray
        except OSError:  # CPUs this process may not use after all
            split = None
    if split:
        for thread in before:
            _set_affinity(thread, set(split[1]))
        os.environ[OMP_BIND] = ",".join(map(str, split[0]))
    try:
        yield split
    finally:
        if split:
            os.environ.pop(OMP_BIND, None)
            for thread, cpus in before.items():
                _set_affinity(thread, cpus)


def _engine_split(serve_cfg: ServeConfig) -> tuple[list[int], list[int]] | None:
    from rayalign.cluster import engine_core_split

    kwargs = engine_kwargs(serve_cfg.engine)
    workers = 1
    for key in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
        workers *= int(kwargs.get(key, 1))
    # A user's own binding, reserve or memory nodes change what vLLM chooses: leave it to them.
    chosen = {OMP_BIND, "VLLM_CPU_NUM_OF_RESERVED_CPU", "CPU_VISIBLE_MEMORY_NODES"} & set(os.environ)
    if (not serve_cfg.isolate_engine_cores or serve_cfg.engine.gpus_per_engine or workers != 1 or chosen
            or not hasattr(os, "sched_setaffinity")):
        return None
    return engine_core_split()


def _thread_affinities() -> dict[int, set[int]]:
    found = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            found[int(task.name)] = os.sched_getaffinity(int(task.name))
        except OSError:  # ended meanwhile
            pass
    return found


def _set_affinity(thread: int, cpus: set[int]) -> None:
    try:
        os.sched_setaffinity(thread, cpus)
    except OSError:  # ended meanwhile
        pass


def _serve_until_stopped(app_name: str, owns_ray: bool) -> None:
    """Until Ctrl-C or SIGTERM. Then, on a Ray this process started, stop that Ray with
    everything in it (in seconds); on a cluster, remove the application, which Serve drains."""
    from ray import serve

    from rayalign.cluster import stop_ray

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)  # clean up on `kill` as on Ctrl-C
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        if owns_ray:
            print(f"stopping: {app_name!r} stops with the Ray this command started", flush=True)
        else:
            # Serve keeps a replica reachable while it drains, so that load balancers deregister it.
            print(f"stopping: removing {app_name!r}; Serve drains its replicas first, "
                  f"which can take half a minute", flush=True)
    finally:
        if owns_ray:
            stop_ray()
        else:
            serve.delete(app_name)


def serve_status(config: RunConfig) -> dict:
    """The application's status on the cluster, per deployment with replica counts."""
    serve = _connect_existing(config, "status")
    app = serve.status().applications.get(config.serve.app_name)
    if app is None:
        return {"app": config.serve.app_name, "status": "NOT_RUNNING", "deployments": {}}
    deployments = {name: {"status": _name(d.status), "message": d.message,
                          "replicas": {_name(state): n for state, n in d.replica_states.items()}}
                   for name, d in app.deployments.items()}
    return {"app": config.serve.app_name, "status": _name(app.status), "message": app.message,
            "url": base_url(config.serve), "deployments": deployments}


def serve_shutdown(config: RunConfig) -> None:
    """Remove the application; stop Serve too when no other application is left on it."""
    from rayalign.cluster import started_ray_here

    serve = _connect_existing(config, "shutdown")
    if config.serve.app_name in serve.status().applications:
        serve.delete(config.serve.app_name)
    if not serve.status().applications and not started_ray_here():
        serve.shutdown()  # a Ray this process started stops whole at the end of the command


def _name(value) -> str:
    return str(getattr(value, "value", value))


def _connect_existing(config: RunConfig, what: str):
    import ray
    from ray import serve

    if not (config.cluster.address or os.environ.get("RAY_ADDRESS") or ray.is_initialized()):
        raise ServeError(f"serve {what} needs the Ray cluster the app runs on: set cluster.address "
                         f"(e.g. cluster.address=auto) or RAY_ADDRESS")

    from rayalign.cluster import connect

    connect(config.cluster)
    return serve


def _driver_key(serve_cfg: ServeConfig) -> str | None:
    if serve_cfg.api_key_env is None:
        return None
    key = os.environ.get(serve_cfg.api_key_env)
    if not key:
        raise ServeError(f"serve.api_key_env: the environment variable {serve_cfg.api_key_env} is not set; "
                         f"export it (and on every node of a cluster) before serving")
    return key


def _run_with_timeout(serve, app, serve_cfg: ServeConfig) -> None:
    """serve.run returns only once the application runs, and never when resources are short."""
    failure: list[BaseException] = []

    def run():
        try:
            serve.run(app, name=serve_cfg.app_name, route_prefix="/", blocking=False)
        except BaseException as exc:  # reported in the caller's thread
            failure.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(serve_cfg.ready_timeout_s)
    if failure or thread.is_alive():
        problem = _problems(serve, serve_cfg.app_name) or (str(failure[0]).strip().splitlines() or ["?"])[-1]
        serve.delete(serve_cfg.app_name)
        waited = f"did not start in serve.ready_timeout_s={serve_cfg.ready_timeout_s:g} s" if not failure \
            else "failed to deploy"
        raise ServeError(f"the Serve application {serve_cfg.app_name!r} {waited}: {problem}")


def _problems(serve, app_name: str) -> str:
    app = serve.status().applications.get(app_name)
    if app is None:
        return ""
    messages = [f"{name}: {d.message}" for name, d in app.deployments.items() if d.message]
    return "; ".join(messages) or app.message


def _listed_models(url: str, key: str | None, timeout_s: float) -> list[str]:
    request = urllib.request.Request(url + "/v1/models", headers={"Authorization": f"Bearer {key or 'EMPTY'}"})
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return [m["id"] for m in json.load(response)["data"]]
        except (OSError, ValueError, KeyError) as exc:
            if time.monotonic() > deadline:
                raise ServeError(f"{url}/v1/models did not answer ({exc})") from None
            time.sleep(1)


# ---- the keyed ingress -----------------------------------------------------------------------

class BearerKey:
    """ASGI middleware: 401 unless `Authorization: Bearer <key>`; the key is never echoed."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not self._authorized(scope):
            body = json.dumps({"error": {
                "message": "Missing or wrong API key: send it as the header 'Authorization: Bearer <key>'.",
                "type": "authentication_error", "code": "invalid_api_key"}}).encode()
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")]})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope) -> bool:
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, given = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.key)


def _key_from(api_key_env: str) -> str:
    key = os.environ.get(api_key_env)
    if not key:
        raise RuntimeError(f"the environment variable {api_key_env} (serve.api_key_env) is not set "
                           f"on this Serve node; set it where Ray runs (ray start, pod env)")
    return key


@functools.cache
def _keyed_ingress():
    from ray.serve.llm.ingress import OpenAiIngress

    class KeyedIngress(OpenAiIngress):
        """ray.serve.llm's OpenAI ingress with BearerKey in front of all of its routes."""

        def __init__(self, *args, api_key_env: str, **kwargs):
            super().__init__(*args, **kwargs)
            self._api_key = _key_from(api_key_env)

        def __serve_build_asgi_app__(self):
            # Called by the replica after __init__, before the app serves its first request:
            # the last moment middleware can still be added to the FastAPI app.
            self._asgi_app.add_middleware(BearerKey, key=self._api_key)
            return self._asgi_app

    KeyedIngress.__module__ = __name__
    return KeyedIngress


@functools.cache
def _keyed_server():
    from ray.serve.llm import LLMServer

    class KeyedLLMServer(LLMServer):
        """One model's LLMServer as its own ingress, with BearerKey in front of vLLM's routes."""

        async def __init__(self, llm_config, *, api_key_env: str, **kwargs):
            self._api_key = _key_from(api_key_env)  # before the engine starts: fail fast
            await super().__init__(llm_config, **kwargs)

        async def __serve_build_asgi_app__(self):
            app = await super().__serve_build_asgi_app__()
            # vLLM builds its middleware stack eagerly; dropping it makes Starlette rebuild it
            # on the first request, with BearerKey outermost.
            app.middleware_stack = None
            app.add_middleware(BearerKey, key=self._api_key)
            return app

    KeyedLLMServer.__module__ = __name__
    return KeyedLLMServer


def __getattr__(name: str):
    # Serve imports the ingress by path (KEYED_INGRESS); building it imports vLLM (~10 s),
    # so `rayalign serve status` and `import rayalign.serve` stay fast.
    if name == "KeyedIngress":
        return _keyed_ingress()
    if name == "KeyedLLMServer":
        return _keyed_server()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
