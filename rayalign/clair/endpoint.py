"""Calls to an OpenAI-compatible chat endpoint: bounded concurrency, a request-rate cap, and
retries with exponential backoff and full jitter on 429, 5xx, timeouts, broken connections and
garbage responses. Other errors (400, 401, 404) fail at once. The API key is read from the
environment and never logged or returned.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from dataclasses import dataclass

# One INFO line per HTTP request (the `openai` client's httpx, httpx2 from openai 3 on) drowns
# progress once a library has set the root logger to INFO, as Ray Serve does; failures are
# reported here, with retries.
for _name in ("httpx", "httpx2"):
    logging.getLogger(_name).setLevel(logging.WARNING)


class RequestFailed(Exception):
    """A request that still failed after its retries; the message is the reason."""


@dataclass
class Reply:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


def api_key(env_name: str | None) -> str:
    """The key from the environment. Servers without auth accept any value (e.g. EMPTY)."""
    if env_name is None:
        return "EMPTY"
    key = os.environ.get(env_name)
    if not key:
        raise RequestFailed(f"environment variable {env_name} is not set (set it to the API key, "
                            f"or to EMPTY for a server without authentication)")
    return key


class RateLimiter:
    """Spaces request starts at least 1/rate seconds apart (per process)."""

    def __init__(self, rate: float | None):
        self.interval = 1.0 / rate if rate else 0.0
        self.next_start = 0.0
        self.lock = asyncio.Lock()

    async def wait(self) -> None:
        if not self.interval:
            return
        async with self.lock:
            now = time.monotonic()
            delay = self.next_start - now
            self.next_start = max(now, self.next_start) + self.interval
        if delay > 0:
            await asyncio.sleep(delay)


class Endpoint:
    def __init__(self, base_url: str, model: str, api_key_env: str | None, *, max_concurrency: int = 8,
                 requests_per_second: float | None = None, max_retries: int = 6, timeout_s: float = 60.0,
                 backoff_s: float = 0.5, max_backoff_s: float = 30.0):
        from openai import AsyncOpenAI

        # The client's own retries are off: this class retries, and also on garbage responses.
        self.client = AsyncOpenAI(base_url=base_url, api_key=api_key(api_key_env), max_retries=0,
                                  timeout=timeout_s)
        self.model = model
        self.semaphore = asyncio.Semaphore(max_concurrency)
        self.limiter = RateLimiter(requests_per_second)
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.retries = 0

    async def chat(self, messages: list[dict], *, temperature: float, max_tokens: int, seed: int | None = None,
                   schema: dict | None = None) -> Reply:
        import openai

        kwargs = {"model": self.model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens}
        if seed is not None:
            kwargs["seed"] = seed
        if schema is not None:
            kwargs["response_format"] = {"type": "json_schema",
                                         "json_schema": {"name": "answer", "schema": schema, "strict": True}}
        for attempt in range(self.max_retries + 1):
            await self.limiter.wait()
            try:
                async with self.semaphore:
                    response = await self.client.chat.completions.create(**kwargs)
                choice = response.choices[0]
                if choice.message is None or choice.message.content is None:
                    raise _Garbage("the response has no message content")
                usage = response.usage
                return Reply(choice.message.content, choice.finish_reason or "stop",
                             usage.prompt_tokens if usage else 0, usage.completion_tokens if usage else 0)
            except (openai.RateLimitError, openai.InternalServerError, openai.APITimeoutError,
                    openai.APIConnectionError, openai.APIResponseValidationError, _Garbage,
                    ValueError, AttributeError, IndexError, TypeError) as exc:
                reason = _describe(exc)
                if attempt == self.max_retries:
                    raise RequestFailed(f"{reason} (after {attempt + 1} attempts)") from None
                self.retries += 1
                await asyncio.sleep(self._delay(attempt, exc))
            except openai.APIStatusError as exc:
                raise RequestFailed(_describe(exc)) from None
        raise AssertionError("unreachable")

    def _delay(self, attempt: int, exc: Exception) -> float:
        retry_after = _retry_after(exc)
        if retry_after is not None:
            return min(retry_after, self.max_backoff_s)
        return random.uniform(0, min(self.max_backoff_s, self.backoff_s * 2 ** attempt))

    async def close(self) -> None:
        await self.client.close()


class _Garbage(Exception):
    pass


def _describe(exc: Exception) -> str:
    import openai

    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code} from the endpoint"
    if isinstance(exc, openai.APITimeoutError):
        return "request timed out"
    if isinstance(exc, openai.APIConnectionError):
        return "connection failed"
    return f"unusable response ({exc.__class__.__name__})"


def _retry_after(exc: Exception) -> float | None:
    response = getattr(exc, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None
