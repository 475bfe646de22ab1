"""The API key: with `serve.api_key_env` set, every route answers 401 unless the request carries
`Authorization: Bearer <key>` (`BearerKey`, in front of `KeyedIngress` or `KeyedLLMServer`).
Each replica reads the key from its own environment, so the key never appears in a config, a
file or a log: only the variable's name does.

The two classes subclass Ray's and vLLM's servers, so they are built on first use (building
imports vLLM, about 10 s) and known to Serve by the import path `rayalign.serve:KeyedIngress`."""

from __future__ import annotations

import functools
import hmac
import json
import os


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
def keyed_ingress():
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

    KeyedIngress.__module__ = "rayalign.serve"  # where Serve and pickle look it up
    return KeyedIngress


@functools.cache
def keyed_server():
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

    KeyedLLMServer.__module__ = "rayalign.serve"
    return KeyedLLMServer
