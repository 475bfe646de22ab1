"""Deploying, serving until stopped, status and shutdown: the lifecycle of the application that
`rayalign.serve.app` describes, on the Ray this process starts or joins."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.error
import urllib.request

from rayalign.config import RunConfig, ServeConfig
from rayalign.serve.app import (ONE_MODEL_BUILDER, ServeError, app_args, base_url, build_app, builder, output_dir,
                                write_deploy_file)
from rayalign.serve.placement import ray_kept_off_engine_cpus


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
    with ray_kept_off_engine_cpus(serve_cfg, owns_ray) as cpus:
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
