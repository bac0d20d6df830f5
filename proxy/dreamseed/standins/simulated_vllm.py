"""A simulated vLLM server: a real HTTP process speaking vLLM's OpenAI-compatible API.

No GPU exists where DreamSeed is developed and tested, so tests, benchmarks and the demo
run this instead of vLLM. The proxy does not know the difference: it talks to it over
HTTP like to any backend. Run it with::

    python -m dreamseed.standins.simulated_vllm --port 8000 --model mistralai/Mistral-7B-Instruct-v0.3 --ttft 0.05

Behaviour knobs (flags at start, or ``POST /sim/config`` with a JSON object at run time):
``ttft`` seconds to the first token, ``ttft_jitter`` (0-1) how far each request's ttft varies
either way (uniformly; a real server's does, and clients then drift apart; 0 keeps exact
timings), ``token_delay`` seconds between tokens, ``tokens`` per answer, ``error_rate`` (0-1)
of requests answered with ``error_status``, ``hang_rate`` of requests that never answer,
``crash_after`` tokens after which a stream's connection is dropped, ``slow_start`` seconds
during which the server is up but not ready (503), ``answer`` the text of every answer (a token a
word; by default "Simulated answer from <model>." and numbered tokens).
``GET /sim/stats`` reports what it saw (requests, finished and cancelled streams, the last
request's headers and body); ``POST /sim/reset`` clears that.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import re
import socket
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import msgspec

Scope = dict[str, Any]


@dataclass
class Knobs:
    model: str = "simulated-model"
    ttft: float = 0.0
    ttft_jitter: float = 0.0
    token_delay: float = 0.0
    tokens: int = 16
    error_rate: float = 0.0
    error_status: int = 500
    hang_rate: float = 0.0
    crash_after: int | None = None
    slow_start: float = 0.0
    max_model_len: int = 8192
    api_key: str | None = None
    answer: str | None = None  # every answer's text (cut at max_tokens words) instead of "Simulated answer ..."


@dataclass
class Stats:
    requests: int = 0
    finished: int = 0
    cancelled: int = 0
    crashed: int = 0
    active: int = 0
    peak_active: int = 0  # the most requests it held at once since the last reset
    errors: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    last_headers: dict[str, str] = field(default_factory=dict)
    last_body: Any = None


class SimulatedVLLM:
    """The ASGI application (plain ASGI, no framework, so it is never the bottleneck)."""

    def __init__(self, knobs: Knobs) -> None:
        self.knobs = knobs
        self.stats = Stats()
        self.started = time.monotonic()
        self.created = int(time.time())

    def ready(self) -> bool:
        return time.monotonic() - self.started >= self.knobs.slow_start

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await receive()  # lifespan.startup
            await send({"type": "lifespan.startup.complete"})
            await receive()  # lifespan.shutdown
            await send({"type": "lifespan.shutdown.complete"})
            return
        method, path = scope["method"], scope["path"]
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if path == "/health" and method == "GET":
            await _respond(send, 200 if self.ready() else 503, b"")
        elif path == "/metrics" and method == "GET":
            await _respond(send, 200, self.metrics().encode(), b"text/plain; version=0.0.4")
        elif path == "/sim/stats" and method == "GET":
            await _respond_json(send, 200, asdict(self.stats))
        elif path == "/sim/reset" and method == "POST":
            self.stats = Stats()
            await _respond_json(send, 200, {"ok": True})
        elif path == "/sim/config" and method == "POST":
            await self.configure(send, body)
        elif path.startswith("/v1/"):
            await self.openai(scope, receive, send, method, path, body)
        else:
            await _respond_json(send, 404, _error("Not Found", "NotFoundError", 404))

    async def configure(self, send: Any, body: bytes) -> None:
        changes = msgspec.json.decode(body or b"{}")
        names = {f.name for f in fields(Knobs)}
        unknown = set(changes) - names
        if unknown:
            await _respond_json(send, 400, _error(f"unknown knobs: {sorted(unknown)}", "BadRequestError", 400))
            return
        for name, value in changes.items():
            setattr(self.knobs, name, value)
        if "slow_start" in changes:
            self.started = time.monotonic()
        await _respond_json(send, 200, asdict(self.knobs))

    async def openai(self, scope: Scope, receive: Any, send: Any, method: str, path: str, body: bytes) -> None:
        knobs = self.knobs
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        if knobs.api_key and headers.get("authorization") != f"Bearer {knobs.api_key}":
            await _respond_json(send, 401, {"error": "Unauthorized"})
            return
        if not self.ready():
            await _respond_json(send, 503, _error("model is still loading", "ServiceUnavailableError", 503))
            return
        if path == "/v1/models" and method == "GET":
            await _respond_json(send, 200, {"object": "list", "data": [{
                "id": knobs.model, "object": "model", "created": self.created, "owned_by": "vllm",
                "root": knobs.model, "max_model_len": knobs.max_model_len}]})
            return
        if method != "POST" or path not in ("/v1/chat/completions", "/v1/completions"):
            await _respond_json(send, 404, _error("Not Found", "NotFoundError", 404))
            return
        self.stats.requests += 1
        self.stats.last_headers = headers
        try:
            request = msgspec.json.decode(body)
        except msgspec.DecodeError:
            await _respond_json(send, 400, _error("invalid JSON", "BadRequestError", 400))
            return
        self.stats.last_body = request
        problem = _invalid(request, knobs.max_model_len)
        if problem is not None:
            await _respond_json(send, 400, _error(problem, "BadRequestError", 400))
            return
        if request.get("model") != knobs.model:
            await _respond_json(send, 404, _error(f"The model `{request.get('model')}` does not exist.", "NotFoundError", 404))
            return
        if knobs.error_rate and random.random() < knobs.error_rate:
            self.stats.errors += 1
            await _respond_json(send, knobs.error_status, _error("simulated failure", "InternalServerError", knobs.error_status))
            return
        disconnected = asyncio.Event()
        watcher = asyncio.create_task(_watch_disconnect(receive, disconnected))
        self.stats.active += 1
        self.stats.peak_active = max(self.stats.peak_active, self.stats.active)
        try:
            if knobs.hang_rate and random.random() < knobs.hang_rate:
                await disconnected.wait()
                self.stats.cancelled += 1
                return
            chat = path == "/v1/chat/completions"
            if request.get("stream"):
                await self.stream(send, request, chat, disconnected)
            else:
                await self.complete(send, request, chat, disconnected)
        finally:
            self.stats.active -= 1
            watcher.cancel()

    def _tokens(self, count: int) -> list[str]:
        if self.knobs.answer is not None:
            return re.findall(r"\S+\s*", self.knobs.answer)[:count]  # a token a word, its space kept
        name = self.knobs.model.rsplit("/", 1)[-1]
        words = ["Simulated", "answer", "from", name + "."]
        return [(words[i] if i < len(words) else f"token{i}") + " " for i in range(count)]

    def _budget(self, request: dict[str, Any]) -> tuple[int, str]:
        limit = request.get("max_tokens") or request.get("max_completion_tokens")
        count = self.knobs.tokens
        if isinstance(limit, int) and 0 < limit < count:
            return limit, "length"
        return count, "stop"

    def _answer(self, request: dict[str, Any]) -> tuple[list[str], str]:
        """The tokens to send and the finish reason: cut at max_tokens, or before the first stop
        string the text would contain (which is then not sent, as in vLLM)."""
        count, finish = self._budget(request)
        tokens = self._tokens(count)
        stops = request.get("stop") or []
        stops = [stops] if isinstance(stops, str) else [s for s in stops if isinstance(s, str) and s]
        text = ""
        for i, token in enumerate(tokens):
            found = [at for at in ((text + token).find(s) for s in stops) if at >= 0]
            if found:
                kept = (text + token)[:min(found)][len(text):]
                return tokens[:i] + ([kept] if kept else []), "stop"
            text += token
        return tokens, finish

    def _ttft(self) -> float:
        jitter = self.knobs.ttft_jitter
        return self.knobs.ttft * (random.uniform(1 - jitter, 1 + jitter) if jitter else 1.0)

    async def complete(self, send: Any, request: dict[str, Any], chat: bool, disconnected: asyncio.Event) -> None:
        tokens, finish = self._answer(request)
        count, n = len(tokens), _choices(request)
        delay = self._ttft() + self.knobs.token_delay * max(count - 1, 0)
        if delay and await _sleep_or_disconnect(delay, disconnected):
            self.stats.cancelled += 1
            return
        text = "".join(tokens)
        prompt_tokens = _prompt_tokens(request)
        created, ident = int(time.time()), uuid.uuid4().hex
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": count * n, "total_tokens": prompt_tokens + count * n}
        logprobs = _logprobs(request, tokens, chat)
        if chat:
            body = {"id": f"chatcmpl-{ident}", "object": "chat.completion", "created": created, "model": self.knobs.model,
                    "choices": [{"index": i, "message": {"role": "assistant", "content": text, "refusal": None},
                                 "logprobs": logprobs,
                                 "finish_reason": finish} for i in range(n)], "usage": usage}
        else:
            body = {"id": f"cmpl-{ident}", "object": "text_completion", "created": created, "model": self.knobs.model,
                    "choices": [{"index": i, "text": text, "logprobs": logprobs, "finish_reason": finish} for i in range(n)],
                    "usage": usage}
        self._account(prompt_tokens, count * n)
        await _respond_json(send, 200, body)

    async def stream(self, send: Any, request: dict[str, Any], chat: bool, disconnected: asyncio.Event) -> None:
        knobs = self.knobs
        tokens, finish = self._answer(request)
        count, n = len(tokens), _choices(request)
        created, model = int(time.time()), knobs.model
        ident = f"chatcmpl-{uuid.uuid4().hex}" if chat else f"cmpl-{uuid.uuid4().hex}"
        kind = "chat.completion.chunk" if chat else "text_completion"

        def event(choice: dict[str, Any], usage: dict[str, int] | None = None) -> bytes:
            chunk: dict[str, Any] = {"id": ident, "object": kind, "created": created, "model": model,
                                     "choices": [choice] if choice else []}
            if usage is not None:
                chunk["usage"] = usage
            return b"data: " + msgspec.json.encode(chunk) + b"\n\n"

        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]})
        if knobs.ttft and await _sleep_or_disconnect(self._ttft(), disconnected):
            self.stats.cancelled += 1
            return
        if chat:  # vLLM's first chunk, sent with the first token, only names the role
            await send({"type": "http.response.body", "more_body": True, "body": b"".join(
                event({"index": c, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None})
                for c in range(n))})
        for i, token in enumerate(tokens):
            if i and knobs.token_delay and await _sleep_or_disconnect(knobs.token_delay, disconnected):
                self.stats.cancelled += 1
                return
            if disconnected.is_set():
                self.stats.cancelled += 1
                return
            if knobs.crash_after is not None and i >= knobs.crash_after:
                self.stats.crashed += 1
                # Dropping the connection without ending the chunked body is what a dying server looks like.
                raise SimulatedCrashError(f"simulated crash after {i} tokens")
            logprobs = _logprobs(request, [token], chat)
            choices: list[dict[str, Any]]
            if chat:
                choices = [{"index": c, "delta": {"content": token}, "logprobs": logprobs, "finish_reason": None}
                           for c in range(n)]
            else:
                choices = [{"index": c, "text": token, "logprobs": logprobs, "finish_reason": None} for c in range(n)]
            await send({"type": "http.response.body", "body": b"".join(event(c) for c in choices), "more_body": True})
        tail = b"".join(event({"index": c, "delta": {}, "logprobs": None, "finish_reason": finish} if chat else {
            "index": c, "text": "", "logprobs": None, "finish_reason": finish}) for c in range(n))
        prompt_tokens = _prompt_tokens(request)
        if (request.get("stream_options") or {}).get("include_usage"):
            tail += event({}, {"prompt_tokens": prompt_tokens, "completion_tokens": count * n,
                               "total_tokens": prompt_tokens + count * n})
        await send({"type": "http.response.body", "body": tail + b"data: [DONE]\n\n", "more_body": False})
        self._account(prompt_tokens, count * n)

    def _account(self, prompt_tokens: int, generated: int) -> None:
        self.stats.finished += 1
        self.stats.prompt_tokens += prompt_tokens
        self.stats.generation_tokens += generated

    def metrics(self) -> str:
        labels = f'model_name="{self.knobs.model}",engine="0"'
        s = self.stats
        return "".join([
            "# HELP vllm:num_requests_running Number of requests in model execution batches.\n",
            "# TYPE vllm:num_requests_running gauge\n", f"vllm:num_requests_running{{{labels}}} {s.active}\n",
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n",
            "# TYPE vllm:num_requests_waiting gauge\n", f"vllm:num_requests_waiting{{{labels}}} 0\n",
            "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.\n",
            "# TYPE vllm:kv_cache_usage_perc gauge\n", f"vllm:kv_cache_usage_perc{{{labels}}} {min(s.active / 64, 1):.4f}\n",
            "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.\n",
            "# TYPE vllm:prompt_tokens_total counter\n", f"vllm:prompt_tokens_total{{{labels}}} {s.prompt_tokens}\n",
            "# HELP vllm:generation_tokens_total Number of generation tokens processed.\n",
            "# TYPE vllm:generation_tokens_total counter\n", f"vllm:generation_tokens_total{{{labels}}} {s.generation_tokens}\n",
            "# HELP vllm:request_success_total Count of successfully processed requests.\n",
            "# TYPE vllm:request_success_total counter\n",
            f'vllm:request_success_total{{{labels},finished_reason="stop"}} {s.finished}\n',
        ])


class SimulatedCrashError(Exception):
    pass


def _error(message: str, kind: str, code: int) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def _invalid(request: dict[str, Any], max_model_len: int) -> str | None:
    """What vLLM answers 400 for, among the fields the simulator reads; None when fine."""
    options = request.get("stream_options")
    if options is not None and (not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool)):
        return "stream_options: must be an object with a boolean include_usage"
    if options is not None and not request.get("stream"):
        return "Stream options can only be defined when `stream=True`."
    n = request.get("n", 1)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return f"n must be at least 1, got {n}."
    sampling = _sampling_problem(request)
    if sampling is not None:
        return sampling
    prompt = _prompt_tokens(request)
    limit = request.get("max_tokens") or request.get("max_completion_tokens") or 0
    if not isinstance(limit, int):
        return "max_tokens: must be an integer"
    if prompt + limit > max_model_len or prompt >= max_model_len:
        return (f"This model's maximum context length is {max_model_len} tokens. However, you requested "
                f"{prompt + limit} tokens ({prompt} in the messages, {limit} in the completion). "
                "Please reduce the length of the messages or completion.")
    return None


def _number(request: dict[str, Any], name: str, default: float) -> float:
    value = request.get(name)
    return default if value is None or isinstance(value, bool) or not isinstance(value, int | float) else float(value)


def _sampling_problem(request: dict[str, Any]) -> str | None:
    """vLLM's own range checks of the sampling fields (vllm/sampling_params.py, SamplingParams._verify_args),
    with its messages: a request the proxy lets through gets the answer vLLM would give."""
    for name in ("presence_penalty", "frequency_penalty"):
        value = _number(request, name, 0.0)
        if not -2.0 <= value <= 2.0:
            return f"{name} must be in [-2, 2], got {value}."
    temperature = _number(request, "temperature", 1.0)
    if not math.isfinite(temperature):
        return f"temperature must be a finite number, got {temperature}."
    if temperature < 0.0:
        return f"temperature must be non-negative, got {temperature}."
    if temperature > 2.0:
        return f"temperature must be in [0, 2], got {temperature}."
    top_p = _number(request, "top_p", 1.0)
    if not 0.0 < top_p <= 1.0:
        return f"top_p must be in (0, 1], got {top_p}."
    for name in ("max_tokens", "max_completion_tokens"):
        limit = request.get(name)
        if isinstance(limit, int) and not isinstance(limit, bool) and limit < 1:
            return f"max_tokens must be at least 1, got {limit}."
    logprobs = request.get("logprobs")
    if isinstance(logprobs, int) and not isinstance(logprobs, bool) and logprobs != -1 and logprobs < 0:
        return f"logprobs must be non-negative or -1, got {logprobs}."
    stops = request.get("stop")
    if isinstance(stops, list) and any(stop == "" for stop in stops):
        return "stop cannot contain an empty string."
    return None


def _choices(request: dict[str, Any]) -> int:
    n: int = request.get("n") or 1
    return n


def _logprobs(request: dict[str, Any], tokens: list[str], chat: bool) -> dict[str, Any] | None:
    """Logprobs in the shape asked for: chat's `logprobs: true` (+ `top_logprobs`), or the
    legacy completions' `logprobs: N`. Values are made up but well formed."""
    if chat:
        if not request.get("logprobs"):
            return None
        top = int(request.get("top_logprobs") or 0)

        def item(token: str, logprob: float) -> dict[str, Any]:
            return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

        return {"content": [{**item(t, -0.5), "top_logprobs": [item(t, -0.5 - k) for k in range(top)]} for t in tokens],
                "refusal": None}
    if request.get("logprobs") in (None, False):
        return None
    offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
    return {"tokens": tokens, "token_logprobs": [-0.5] * len(tokens), "text_offset": offsets,
            "top_logprobs": [{t: -0.5} for t in tokens]}


def _prompt_tokens(request: dict[str, Any]) -> int:
    if "messages" in request:
        text = " ".join(str(m.get("content", "")) for m in request.get("messages") or [] if isinstance(m, dict))
    else:
        text = str(request.get("prompt", ""))
    return max(1, len(text) // 4)


async def _watch_disconnect(receive: Any, disconnected: asyncio.Event) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    disconnected.set()


async def _sleep_or_disconnect(seconds: float, disconnected: asyncio.Event) -> bool:
    """Sleep, waking early if the client goes away; True if it did."""
    try:
        await asyncio.wait_for(disconnected.wait(), seconds)
    except TimeoutError:
        return False
    return True


async def _respond(send: Any, status: int, body: bytes, media_type: bytes = b"application/json") -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", media_type), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _respond_json(send: Any, status: int, data: Any) -> None:
    await _respond(send, status, msgspec.json.encode(data))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m dreamseed.standins.simulated_vllm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed on start)")
    for knob in fields(Knobs):
        flag = "--" + knob.name.replace("_", "-")
        kind = {"model": str, "api_key": str, "answer": str, "tokens": int, "error_status": int, "max_model_len": int,
                "crash_after": int}.get(knob.name, float)
        parser.add_argument(flag, type=kind, default=knob.default)
    args = parser.parse_args(argv)
    knobs = Knobs(**{f.name: getattr(args, f.name) for f in fields(Knobs)})

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(2048)  # before announcing: connections queue until the server accepts
    port = sock.getsockname()[1]
    config = uvicorn.Config(SimulatedVLLM(knobs), log_level="warning", access_log=False, lifespan="on",
                            loop="uvloop" if sys.platform != "win32" else "asyncio", http="httptools",
                            timeout_graceful_shutdown=1)
    print(f"SIMULATED vLLM serving {knobs.model} listening on http://{args.host}:{port}", flush=True)
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
