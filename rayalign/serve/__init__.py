"""Serving checkpoints on Ray Serve behind an OpenAI-compatible API (/v1/chat/completions,
/v1/completions, /v1/models, streaming), with Serve's health route /-/healthz. Every touch of
`ray.serve.llm` lives in this package: its API moves between Ray releases.

- `app`: what to deploy (the application's arguments, its builder, the Serve config file);
- `lifecycle`: deploying, serving until stopped, status and shutdown;
- `placement`: a local Ray's processes kept off the CPUs of a CPU engine's model worker;
- `auth`: the API key in front of every route.

Deploy files name `rayalign.serve:build_app` and `rayalign.serve:KeyedIngress`; both stay here.
"""

from rayalign.serve.app import (BUILDER, KEYED_INGRESS, ONE_MODEL_BUILDER, ServeError, app_args, base_url, build_app,
                                builder, deploy_file, output_dir, parse_models, resolve_source, write_deploy_file)
from rayalign.serve.auth import BearerKey
from rayalign.serve.lifecycle import serve_models, serve_shutdown, serve_status

__all__ = ["BUILDER", "KEYED_INGRESS", "ONE_MODEL_BUILDER", "BearerKey", "ServeError", "app_args", "base_url",
           "build_app", "builder", "deploy_file", "output_dir", "parse_models", "resolve_source", "serve_models",
           "serve_shutdown", "serve_status", "write_deploy_file"]


def __getattr__(name: str):
    # Serve imports the ingress by path (KEYED_INGRESS); building it imports vLLM (~10 s),
    # so `rayalign serve status` and `import rayalign.serve` stay fast.
    from rayalign.serve import auth

    if name == "KeyedIngress":
        return auth.keyed_ingress()
    if name == "KeyedLLMServer":
        return auth.keyed_server()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
