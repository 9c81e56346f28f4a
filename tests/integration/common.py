"""Helpers shared by the real-engine suites: requests in engine terms, draining a stream."""

from __future__ import annotations

from medserve.engines.base import Engine, GenerationChunk, GenerationRequest, Message, Sampling


def request(
    source: str | tuple[Message, ...], rid: str = "r", **sampling: object
) -> GenerationRequest:
    """A greedy request (repeat penalty 1.3, 24 tokens) unless ``sampling`` says otherwise:
    a completion of the text ``source``, or a chat of the messages ``source``."""
    base: dict[str, object] = {
        "max_tokens": 24,
        "temperature": 0.0,
        "top_p": 1.0,
        "top_k": 40,
        "min_p": 0.0,
        "repeat_penalty": 1.3,
        "frequency_penalty": 0.0,
        "presence_penalty": 0.0,
        "seed": 7,
    }
    base.update(sampling)
    params = Sampling(**base)  # type: ignore[arg-type]
    if isinstance(source, str):
        return GenerationRequest(rid, "m", params, prompt=source)
    return GenerationRequest(rid, "m", params, messages=source)


async def collect(engine: Engine, req: GenerationRequest) -> tuple[str, GenerationChunk]:
    """The whole text and the final chunk; fails if the stream ended without one."""
    parts = []
    last = None
    async for chunk in engine.generate(req):
        parts.append(chunk.text)
        last = chunk
    assert last is not None and last.finish_reason is not None
    return "".join(parts), last
