"""A fake vLLM OpenAI server on 127.0.0.1 with failure knobs (for the vllm engine's tests).

A raw ASGI app under uvicorn on its own thread and event loop. It answers ``/health``,
``/v1/models`` (with ``max_model_len``), ``/metrics`` (vLLM's load gauges under their real
names, :func:`metrics_text`), ``/v1/chat/completions`` and ``/v1/completions`` (streaming,
as medserve always asks, or one JSON body when ``stream`` is not true, for benchmarks that
ask it directly). Like the fake engine, one word is one token: the
prompt (chat: ``role: content`` lines plus ``assistant:``) is echoed word by word, cut by
``max_tokens`` (finish ``length``) or a stop string (finish ``stop``); a prompt or budget
that does not fit the context gets vLLM's 400 with its "maximum context length" message.

:class:`Knobs` (set ``upstream.knobs`` before a request) inject what production-stack and
LiteLLM users hit; :attr:`FakeUpstream.seen` records each generation request's headers and
body, sets ``stalled`` when a stall knob starts waiting and counts the token events ``sent``
(so a test can leave at a given stage without sleeping), and sets ``left`` when it saw the
client go away before the response ended. It answers structured requests as vLLM does:
scripted tool-call deltas (``Knobs.tool_calls``), logprobs of every content token when the
body asks for them (:func:`logprobs_of`), JSON when ``Knobs.text`` is JSON, and vLLM's 400
for tool_choice "auto" on a server without a tool-call parser (``Knobs.auto_tools``).

``python -m tests.fakeupstream --port N --knobs '{"token_delay_s": 0.01}'`` serves one in
its own process (benchmarks: the load generator must not share its interpreter).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn

from tests.serverproc import free_port

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@dataclass
class Knobs:
    """Behaviour of the next requests. Delays in seconds; counts in tokens (words)."""

    context: int = 256
    served: str = "m"
    ttft_s: float = 0.0  # after the response headers, before the first event
    token_delay_s: float = 0.0
    stall_before_headers_s: float = 0.0  # before the status line: nothing sent at all
    status: int = 200  # answer this status (with an error body) instead of generating
    error_param: str | None = None  # the error body's `param` (vLLM names the field)
    key: str | None = None  # vLLM --api-key: /v1/* without `Bearer key` answers 401
    tokenize: bool = True  # POST /tokenize counts the prompt (False: 404, as a pool might)
    retry_after: str | None = None
    error_after: int | None = None  # 200, that many tokens, then an error event
    stall_after: int | None = None  # that many tokens, then silence until the client leaves
    drop_after: int | None = None  # that many tokens, then the connection drops
    split: bool = False  # every event written in 1-3 byte pieces (inside UTF-8 characters)
    text: str | None = None  # generate these words instead of the echo
    usage_in_last: bool = False  # usage on the finish chunk, not a choices=[] chunk
    usage: bool = True  # honour include_usage
    health: int = 200
    # /health says nothing for this long (or until the client leaves): a hung server
    # (SIGSTOPped, wedged) that still accepts connections.
    health_stall_s: float = 0.0
    # /metrics: vllm:num_requests_waiting, the KV-cache usage (None: left out), under its
    # old name (vllm:gpu_cache_usage_perc, before vLLM 0.10) when ``old_kv_name``; running
    # is the requests in flight here. ``metrics`` other than 200: that status, no body.
    waiting: int | None = 0
    kv_usage: float | None = 0.0
    old_kv_name: bool = False
    metrics: int = 200
    # vLLM's reasoning parser: these words first, one delta each as {reasoning_field: word}
    # (no content), counted in completion_tokens but not against max_tokens.
    reasoning: str | None = None
    reasoning_field: str = "reasoning_content"  # vLLM < 0.10; newer ones send "reasoning"
    delta_extra: dict[str, Any] | None = None  # more fields in every content delta
    finish: str | None = None  # this finish_reason instead of stop/length
    # Chat: after the content, one delta per entry as {"tool_calls": [entry]} (OpenAI's
    # stream shape, e.g. {"index": 0, "id": "call_1", "type": "function", "function":
    # {"name": "f", "arguments": ""}}); the finish is then "tool_calls" unless `finish`.
    tool_calls: list[dict[str, Any]] | None = None
    # vLLM started without --enable-auto-tool-choice: tool_choice "auto" (or tools without
    # a tool_choice) gets its 400.
    auto_tools: bool = True


@dataclass
class Seen:
    """One generation request as the upstream received it."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    stalled: threading.Event = field(default_factory=threading.Event)
    sent: int = 0  # token events written so far (streaming)
    left: threading.Event = field(default_factory=threading.Event)
    peer: tuple[str, int] | None = None  # the client's address and port: its connection


class FakeUpstream:
    """The ASGI app and its records. Use :func:`running_upstream` to serve it."""

    def __init__(self) -> None:
        self.knobs = Knobs()
        self.seen: list[Seen] = []
        self.url = ""
        self.running = 0  # generation requests in flight
        self.health_checks = 0  # GET /health answered
        self.tokenized: list[dict[str, Any]] = []  # the bodies POST /tokenize received

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        k = self.knobs
        if path == "/health":
            self.health_checks += 1
            if k.health_stall_s and await _client_left(receive, k.health_stall_s):
                return
            await _json(send, k.health, {})
        elif path == "/metrics":
            body = metrics_text(k, self.running).encode() if k.metrics == 200 else b""
            kind = [(b"content-type", b"text/plain; version=0.0.4")]
            await send({"type": "http.response.start", "status": k.metrics, "headers": kind})
            await send({"type": "http.response.body", "body": body})
        elif k.key is not None and path.startswith("/v1/") and not _authorized(scope, k.key):
            await _json(send, 401, {"error": "Unauthorized"})
        elif path == "/tokenize":
            ask = json.loads(await _body(receive))
            self.tokenized.append(ask)
            if not k.tokenize:
                await _json(send, 404, {"detail": "Not Found"})
            else:
                count = len(_prompt(ask).split())
                await _json(send, 200, {"count": count, "max_model_len": k.context})
        elif path == "/v1/models":
            data = [{"id": k.served, "object": "model", "max_model_len": k.context}]
            await _json(send, 200, {"object": "list", "data": data})
        elif path in ("/v1/chat/completions", "/v1/completions"):
            raw = b""
            while True:
                message = await receive()
                raw += message.get("body", b"")
                if not message.get("more_body"):
                    break
            headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
            peer = scope.get("client")
            seen = Seen(path, headers, json.loads(raw), peer=tuple(peer) if peer else None)
            self.seen.append(seen)
            gone = asyncio.Event()

            async def watch() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                gone.set()

            watcher = asyncio.create_task(watch())
            self.running += 1
            try:
                await self._generate(seen, send, gone)
            finally:
                self.running -= 1
                if gone.is_set():
                    seen.left.set()
                watcher.cancel()
        else:
            await _json(send, 404, {"error": {"message": "not found"}})

    async def _generate(self, seen: Seen, send: Send, gone: asyncio.Event) -> None:
        k, body = self.knobs, seen.body

        async def pause(seconds: float, stall: bool = False) -> bool:  # True: the client left
            if stall:
                seen.stalled.set()
            try:
                await asyncio.wait_for(gone.wait(), seconds)
            except TimeoutError:
                return False
            return True

        if k.stall_before_headers_s and await pause(k.stall_before_headers_s, stall=True):
            return
        if k.status != 200:
            extra = {"retry-after": k.retry_after} if k.retry_after else {}
            error = _error(f"upstream says no: {_prompt(body)}", k.error_param)
            await _json(send, k.status, error, extra)
            return
        chat = "messages" in body
        if (
            chat
            and not k.auto_tools
            and body.get("tools")
            and body.get("tool_choice", "auto") == "auto"
        ):
            message = (
                '"auto" tool choice requires --enable-auto-tool-choice and '
                f"--tool-call-parser to be set ({self.url})"
            )
            await _json(send, 400, _error(message))
            return
        prompt = _prompt(body).split()
        max_tokens = body.get("max_tokens")
        n = len(prompt)
        if n >= k.context or (max_tokens is not None and n + max_tokens > k.context):
            message = (
                f"This model's maximum context length is {k.context} tokens. However, your "
                f"request has {n} input tokens. Please reduce the length of the input messages."
                if n >= k.context
                else f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. "
                f"This model's maximum context length is {k.context} tokens and your request "
                f"has {n} input tokens ({max_tokens} > {k.context} - {n})."
            )
            await _json(send, 400, _error(message))
            return
        budget = max_tokens if max_tokens is not None else (k.context - n if chat else 16)
        full = k.text.split() if k.text is not None else prompt
        words, finish = full[:budget], "length" if len(full) > budget else "stop"
        pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
        text, stops = "".join(pieces), body.get("stop") or []
        cut = min((text.find(s) for s in stops if s in text), default=-1)
        if cut >= 0:
            kept, total = [], 0
            for p in pieces:
                if total + len(p) > cut:
                    if cut > total:
                        kept.append(p[: cut - total])
                    break
                kept.append(p)
                total += len(p)
            pieces, finish = kept, "stop"
        finish = k.finish or finish
        thoughts = k.reasoning.split() if chat and k.reasoning is not None else []
        steps: list[dict[str, Any]]  # one per token: a chat delta or a completion's text
        # The choice's logprobs of each step (None: not asked, or a step without content).
        scored: list[dict[str, Any] | None]
        asked = bool(body.get("logprobs")) if chat else body.get("logprobs") is not None
        top_n = int((body.get("top_logprobs") if chat else body.get("logprobs")) or 0)
        if chat:
            steps = [{k.reasoning_field: w if i == 0 else " " + w} for i, w in enumerate(thoughts)]
            scored = [None] * len(steps)
            steps += [{"content": p, **(k.delta_extra or {})} for p in pieces]
            scored += [
                logprobs_of(p, i, top_n, chat) if asked else None for i, p in enumerate(pieces)
            ]
            steps += [{"tool_calls": [call]} for call in k.tool_calls or []]
            scored += [None] * len(k.tool_calls or [])
            if k.tool_calls:
                finish = k.finish or "tool_calls"
        else:
            steps = [{"text": p} for p in pieces]
            scored = [
                logprobs_of(p, i, top_n, chat) if asked else None for i, p in enumerate(pieces)
            ]
        rid, completion = "cmpl-fake", len(steps)
        usage = {
            "prompt_tokens": n,
            "completion_tokens": completion,
            "total_tokens": n + completion,
        }
        if not body.get("stream"):
            await self._whole(body, send, pause, steps, finish, usage)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        if k.ttft_s and await pause(k.ttft_s, stall=True):
            return

        def event(payload: object) -> bytes:
            return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"

        def choice(
            step: dict[str, Any], reason: str | None, logprobs: dict[str, Any] | None = None
        ) -> dict[str, Any]:
            scores = {} if logprobs is None else {"logprobs": logprobs}
            if chat:
                return {"index": 0, "delta": step, **scores, "finish_reason": reason}
            return {"index": 0, **step, **scores, "finish_reason": reason}

        async def write(data: bytes) -> None:
            if not k.split:
                await send({"type": "http.response.body", "body": data, "more_body": True})
                return
            for i in range(0, len(data), 3):  # 3 bytes: cuts 2- and 4-byte characters
                await send(
                    {"type": "http.response.body", "body": data[i : i + 3], "more_body": True}
                )

        if chat:
            await write(
                event({"id": rid, "choices": [{"index": 0, "delta": {"role": "assistant"}}]})
            )
        for i, step in enumerate(steps):
            if i == k.error_after:
                await write(
                    event(
                        {"error": {"message": "boom", "type": "InternalServerError", "code": 500}}
                    )
                )
                return
            if i == k.stall_after:
                seen.stalled.set()
                await gone.wait()
                return
            if i == k.drop_after:
                raise ConnectionResetError("fake upstream drops the connection")
            if i and k.token_delay_s and await pause(k.token_delay_s):
                return
            await write(event({"id": rid, "choices": [choice(step, None, scored[i])]}))
            seen.sent += 1
            if gone.is_set():
                return
        want_usage = k.usage and (body.get("stream_options") or {}).get("include_usage")
        end = {"content": ""} if chat else {"text": ""}
        last: dict[str, Any] = {"id": rid, "choices": [choice(end, finish)]}
        if want_usage and k.usage_in_last:
            last["usage"] = usage
        await write(event(last))
        if want_usage and not k.usage_in_last:
            await write(event({"id": rid, "choices": [], "usage": usage}))
        await write(b"data: [DONE]\n\n")
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _whole(
        self,
        body: dict[str, Any],
        send: Send,
        pause: Callable[..., Awaitable[bool]],
        steps: list[dict[str, Any]],
        finish: str,
        usage: dict[str, int],
    ) -> None:
        """A non-streaming answer: the same timing (ttft_s, then token_delay_s per token),
        then one JSON body with the steps joined (the other failure knobs do not apply)."""
        k = self.knobs
        if k.ttft_s and await pause(k.ttft_s, stall=True):
            return
        for _ in steps[1:]:
            if k.token_delay_s and await pause(k.token_delay_s):
                return
        joined: dict[str, Any] = {}
        for step in steps:
            for name, value in step.items():
                joined[name] = joined.get(name, "") + value if isinstance(value, str) else value
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
        if "messages" in body:
            kind = "chat.completion"
            choice["message"] = {"role": "assistant", "content": "", **joined}
        else:
            kind = "text_completion"
            choice["text"] = joined.get("text", "")
        answer = {"id": "cmpl-fake", "object": kind, "created": 0, "model": body.get("model")}
        await _json(send, 200, {**answer, "choices": [choice], "usage": usage})


def logprobs_of(piece: str, i: int, top: int, chat: bool) -> dict[str, Any]:
    """The fake's logprobs of its ``i``-th content token ``piece``, in vLLM's shape: chat
    ``{"content": [entry]}`` (bytes included), completions the legacy lists (its
    ``top_logprobs`` dict holds the sampled token too, as vLLM's does). The token's
    log-probability is ``-(i + 1) / 4``; alternative ``alt{j}`` scores ``j`` less than it,
    so the sampled token is the most likely; ``top`` alternatives."""
    value = -(i + 1) / 4
    alternatives = [(piece, value)] + [(f"alt{j}", value - j) for j in range(1, top)]
    alternatives = alternatives[:top]
    if chat:
        entry = {
            "token": piece,
            "logprob": value,
            "bytes": list(piece.encode()),
            "top_logprobs": [
                {"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in alternatives
            ],
        }
        return {"content": [entry]}
    return {
        "text_offset": [0],
        "tokens": [piece],
        "token_logprobs": [value],
        "top_logprobs": [{piece: value, **dict(alternatives)}],
    }


def metrics_text(k: Knobs, running: int) -> str:
    """A vLLM ``/metrics`` body: the load gauges medserve reads, as vLLM names and labels
    them (``engine``, ``model_name``), among other families it exports."""
    labels = f'{{engine="0",model_name="{k.served}"}}'
    kv = "vllm:gpu_cache_usage_perc" if k.old_kv_name else "vllm:kv_cache_usage_perc"
    gauges: list[tuple[str, str, float]] = [
        ("vllm:num_requests_running", "Number of requests in model execution batches.", running)
    ]
    if k.waiting is not None:
        gauges.append(("vllm:num_requests_waiting", "Number of requests waiting.", k.waiting))
    if k.kv_usage is not None:
        gauges.append((kv, "KV-cache usage. 1 means 100 percent usage.", k.kv_usage))
    ttft = "vllm:time_to_first_token_seconds"
    lines = [
        "# HELP python_gc_objects_collected_total Objects collected during gc",
        "# TYPE python_gc_objects_collected_total counter",
        'python_gc_objects_collected_total{generation="0"} 1234.0',
    ]
    for name, text, value in gauges:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} gauge", f"{name}{labels} {value}"]
    lines += [
        "# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.",
        "# TYPE vllm:time_to_first_token_seconds histogram",
        f'{ttft}_bucket{{engine="0",le="0.001",model_name="{k.served}"}} 0.0',
        f'{ttft}_bucket{{engine="0",le="+Inf",model_name="{k.served}"}} 3.0',
        f"{ttft}_count{labels} 3.0",
        f"{ttft}_sum{labels} 0.25",
    ]
    return "\n".join(lines) + "\n"


def _prompt(body: dict[str, Any]) -> str:
    if "messages" in body:
        lines = [f"{m['role']}: {m.get('content') or ''}" for m in body["messages"]]
        return "\n".join(lines) + "\nassistant:"
    return str(body.get("prompt", ""))


async def _body(receive: Receive) -> bytes:
    raw = b""
    while True:
        message = await receive()
        raw += bytes(message.get("body", b""))
        if not message.get("more_body"):
            return raw


def _error(message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": "BadRequestError", "param": param, "code": 400}}


def _authorized(scope: Scope, key: str) -> bool:
    """Whether the request carries ``Authorization: Bearer key`` (as vLLM checks it)."""
    headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
    return headers.get("authorization") == f"Bearer {key}"


async def _client_left(receive: Receive, seconds: float) -> bool:
    """Wait up to ``seconds`` for the client to go away; True if it did."""

    async def gone() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    try:
        await asyncio.wait_for(gone(), seconds)
    except TimeoutError:
        return False
    return True


async def _json(
    send: Send, status: int, value: object, extra: dict[str, str] | None = None
) -> None:
    data = json.dumps(value).encode()
    headers = [(b"content-type", b"application/json")]
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


@contextmanager
def running_upstream(tls: tuple[Path, Path] | None = None) -> Iterator[FakeUpstream]:
    """Serve a :class:`FakeUpstream` on a free loopback port (bounded start and stop);
    over https with ``tls`` = (certificate, key) PEM files."""
    app = FakeUpstream()
    port = free_port()
    cert, key = tls or (None, None)
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_config=None,
        lifespan="off",
        ssl_certfile=cert,
        ssl_keyfile=key,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("fake upstream did not start")
        time.sleep(0.02)
    app.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    try:
        yield app
    finally:
        server.should_exit = True
        thread.join(10)


def main() -> None:
    """Serve one fake upstream in this process until interrupted (for benchmarks)."""
    import argparse

    parser = argparse.ArgumentParser(description="A fake vLLM OpenAI server on 127.0.0.1.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--knobs", default="{}", help="Knobs fields as a JSON object")
    args = parser.parse_args()
    app = FakeUpstream()
    app.knobs = Knobs(**json.loads(args.knobs))
    app.url = f"http://127.0.0.1:{args.port}"
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", lifespan="off")


if __name__ == "__main__":
    main()
