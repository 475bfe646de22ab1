"""What to deploy: the application's arguments from the config and the models, the builder
that takes them, and the same arguments written as a Serve config file (`serve deploy FILE`, or
the `serveConfigV2` of a KubeRay RayService), so a cluster runs exactly what was tested locally.

- several models side by side, each under its own name: `ray.serve.llm:build_openai_app`, an
  ingress deployment that routes each request by its `model` to that model's deployment;
- one model: `build_app` below, the model's deployment is itself the HTTP ingress and serves
  vLLM's own OpenAI app; a request crosses one Python process fewer (the ingress), about
  half of what Ray Serve adds to a request alone on a small CPU machine (BENCHMARKS.md).
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from rayalign.config import RunConfig, ServeConfig
from rayalign.llm import engine_kwargs, placement

# Import paths that deploy files name: they stay valid as long as rayalign.serve exports them.
BUILDER = "ray.serve.llm:build_openai_app"  # several models behind one ingress
ONE_MODEL_BUILDER = "rayalign.serve:build_app"  # one model as its own ingress
KEYED_INGRESS = "rayalign.serve:KeyedIngress"


class ServeError(RuntimeError):
    """A deployment problem a user can fix; the message says what to do."""


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

    from rayalign.serve.auth import keyed_server

    key_env = args.get("api_key_env")
    server = keyed_server() if key_env else LLMServer
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
