"""A small HTTP proxy on loopback that injects faults in front of a real OpenAI-compatible server.

`plan(body, attempt)` decides per request: None forwards it upstream; otherwise one of
"429", "500", "timeout" (answers only after `delay_s`), "garbage" (200 with a body that is not
JSON) or "disconnect" (closes the connection without an answer). `attempt` counts requests
with the same body, so a plan can fail the first try and let the retry through.
"""

import asyncio
import collections
import hashlib
import threading

from aiohttp import ClientSession, web


class FaultProxy:
    def __init__(self, upstream: str, plan, delay_s: float = 3.0):
        self.upstream, self.plan, self.delay_s = upstream.rstrip("/"), plan, delay_s
        self.attempts = collections.Counter()
        self.faults = collections.Counter()
        self.authorizations = set()
        self.loop = asyncio.new_event_loop()
        self.port = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        key = hashlib.sha256(body).hexdigest()
        self.attempts[key] += 1
        self.authorizations.add(request.headers.get("Authorization", ""))
        fault = self.plan(body, self.attempts[key]) if request.method == "POST" else None
        if fault:
            self.faults[fault] += 1
        if fault == "429":
            return web.json_response({"error": {"message": "slow down"}}, status=429, headers={"Retry-After": "0"})
        if fault == "500":
            return web.json_response({"error": {"message": "injected"}}, status=500)
        if fault == "timeout":
            await asyncio.sleep(self.delay_s)
            return web.json_response({"error": {"message": "too late"}}, status=504)
        if fault == "garbage":
            return web.Response(body=b'{"choices": [{"mess', content_type="application/json")
        if fault == "disconnect":
            request.transport.close()
            return web.Response(status=500)
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")}
        async with ClientSession() as session:
            async with session.request(request.method, self.upstream + request.path_qs, data=body,
                                       headers=headers) as upstream:
                return web.Response(body=await upstream.read(), status=upstream.status,
                                    content_type=upstream.content_type)

    def start(self) -> str:
        ready = threading.Event()

        def serve():
            asyncio.set_event_loop(self.loop)
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", self.handle)
            runner = web.AppRunner(app)
            self.loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, "127.0.0.1", 0)
            self.loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]
            ready.set()
            self.loop.run_forever()

        threading.Thread(target=serve, daemon=True).start()
        ready.wait(10)
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
