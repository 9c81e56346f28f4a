"""llama.cpp in-process through llama-cpp-python: the CPU engine and the default.

One loaded model per engine. Decoding runs on a dedicated worker thread (llama.cpp releases
the GIL inside its C calls), so the event loop keeps answering ``/health`` and streaming
other bytes while a request generates. Tokens cross to the event loop through an asyncio
queue; a request whose consumer goes away (client disconnect, server shutdown) sets a
cancel flag the worker checks after every token, so the model is free again within one
decode step.

Requests are served one at a time for now; batched decoding of several sequences per
``llama_decode`` replaces the lock in a later change.
"""

from __future__ import annotations

import asyncio
import codecs
import logging
import os
import threading
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import anyio

from medserve.config import ModelSpec
from medserve.engines.base import (
    EngineInfo,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    Health,
    Message,
    Prompt,
)
from medserve.engines.stops import StopMatcher
from medserve.errors import EngineError, InvalidRequestError, UnavailableError

if TYPE_CHECKING:
    from llama_cpp import Llama

log = logging.getLogger(__name__)

Item = GenerationChunk | BaseException | None
Emit = Callable[[Item], None]


class LlamaCppEngine:
    """A GGUF model served by llama.cpp on the CPU."""

    def __init__(self, spec: ModelSpec) -> None:
        self._spec = spec
        self._llama: Llama | None = None
        self._info: EngineInfo | None = None
        self._formatter: Any = None
        # One worker thread owns the model: llama.cpp contexts are not thread-safe.
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"llamacpp-{spec.id}")
        self._lock = asyncio.Lock()
        self._cancels: dict[str, threading.Event] = {}
        self._waiting = 0
        self._closed = False
        self.generated_tokens = 0
        self.prompt_tokens_evaluated = 0

    @property
    def info(self) -> EngineInfo:
        if self._info is None:
            raise RuntimeError("engine not started")
        return self._info

    async def start(self) -> None:
        path = self._spec.weights()
        loop = asyncio.get_running_loop()
        self._llama = await loop.run_in_executor(self._worker, self._load, str(path))

    def _load(self, path: str) -> Llama:
        from llama_cpp import Llama, llama_model_n_ctx_train

        threads = self._spec.threads or os.cpu_count() or 1
        try:
            llama = Llama(
                model_path=path,
                n_ctx=self._spec.context_length or 0,  # 0: the model's trained context
                n_batch=self._spec.batch_size,
                n_threads=threads,
                n_threads_batch=threads,
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            raise EngineError(f"model {self._spec.id!r} failed to load: {exc}") from exc
        trained = int(llama_model_n_ctx_train(llama.model))
        if llama.n_ctx() > trained:
            llama.close()
            raise EngineError(
                f"model {self._spec.id!r}: context_length {llama.n_ctx()} exceeds the "
                f"model's trained context of {trained}"
            )
        template = self._chat_template(llama)
        if template is not None:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            self._formatter = Jinja2ChatFormatter(
                template=template,
                eos_token=_token_text(llama, llama.token_eos()),
                bos_token=_token_text(llama, llama.token_bos()),
                add_generation_prompt=True,
            )
        self._info = EngineInfo(
            name=f"llamacpp:{self._spec.id}",
            kind="llamacpp",
            model=self._spec.id,
            context_length=llama.n_ctx(),
            owned_by=self._spec.owned_by,
            has_chat_template=template is not None,
        )
        log.info(
            "model loaded",
            extra={"model": self._spec.id, "n_ctx": llama.n_ctx(), "threads": threads},
        )
        return llama

    def _chat_template(self, llama: Llama) -> str | None:
        source = self._spec.chat_template
        if source == "gguf":
            template = llama.metadata.get("tokenizer.chat_template")
            return str(template) if template else None
        with open(source, encoding="utf-8") as f:
            return f.read()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for cancel in self._cancels.values():
            cancel.set()
        llama, self._llama = self._llama, None
        loop = asyncio.get_running_loop()
        if llama is not None:
            await loop.run_in_executor(self._worker, llama.close)
        self._worker.shutdown(wait=True)

    def _require(self) -> Llama:
        if self._llama is None:
            raise UnavailableError("The model is not loaded.", code="model_not_ready")
        return self._llama

    async def render_chat(self, messages: tuple[Message, ...]) -> Prompt:
        llama = self._require()
        if self._formatter is None:
            raise InvalidRequestError(
                "This model has no chat template; use /v1/completions.",
                param="messages",
                code="chat_not_supported",
            )
        wire = [{"role": m.role, "content": m.content} for m in messages]
        try:
            text = await asyncio.to_thread(lambda: self._formatter(messages=wire).prompt)
        except Exception as exc:
            # Templates raise on message shapes they refuse (roles that do not alternate,
            # a system message in the wrong place). Their message text is not forwarded.
            raise InvalidRequestError(
                "The model's chat template does not accept this sequence of messages "
                "(for example, roles that must alternate).",
                param="messages",
            ) from exc
        return await asyncio.to_thread(_tokenize, llama, text, True)

    async def render_text(self, text: str) -> Prompt:
        # Plain prompts are tokenized with special-token parsing off: text that happens to
        # look like a control token stays text.
        return await asyncio.to_thread(_tokenize, self._require(), text, False)

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        llama = self._require()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Item] = asyncio.Queue()

        def emit(item: Item) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        cancel = threading.Event()
        self._waiting += 1
        try:
            await self._lock.acquire()
        finally:
            self._waiting -= 1
        self._cancels[request.request_id] = cancel
        try:
            if self._closed:
                raise UnavailableError("The server is shutting down.", code="shutting_down")
            done = loop.run_in_executor(self._worker, self._decode, llama, request, cancel, emit)
            try:
                while (item := await queue.get()) is not None:
                    if isinstance(item, BaseException):
                        raise item
                    yield item
            finally:
                cancel.set()
                # Wait for the worker to notice (at most one decode step) before the next
                # request may use the model; shielded so a cancelled consumer still waits.
                with anyio.CancelScope(shield=True):
                    await done
        finally:
            self._cancels.pop(request.request_id, None)
            self._lock.release()

    def _decode(
        self, llama: Llama, request: GenerationRequest, cancel: threading.Event, emit: Emit
    ) -> None:
        """Worker thread: run one sequence, emitting chunks; always ends with ``None``."""
        try:
            if self._prefill(llama, request.prompt.token_ids, cancel):
                self._sample(llama, request, cancel, emit)
        except Exception:
            # llama.cpp's exception text is logged here (it never holds the prompt); the
            # client gets a generic message.
            log.exception("generation failed", extra={"request_id": request.request_id})
            emit(EngineError("The engine failed while generating."))
        finally:
            emit(None)

    def _prefill(self, llama: Llama, prompt: tuple[int, ...], cancel: threading.Event) -> bool:
        """Evaluate the prompt; False if cancelled on the way.

        Full prefill every time, no reuse of the previous request's KV prefix: reusing it
        changes the batch shape of the prompt's last tokens, and with it float rounding, so
        the same greedy request could answer differently the second time. Same request,
        same seed, same answer matters more here than the prefill it saves. Chunks of
        n_batch (as ``Llama.eval`` would) with a cancel check between them, so a client
        that leaves during a long prompt frees the model within one chunk.
        """
        llama.reset()  # type: ignore[no-untyped-call]
        step = llama.n_batch
        for start in range(0, len(prompt), step):
            if cancel.is_set():
                return False
            llama.eval(prompt[start : start + step])
            self.prompt_tokens_evaluated += min(step, len(prompt) - start)
        return True

    def _sample(
        self, llama: Llama, request: GenerationRequest, cancel: threading.Event, emit: Emit
    ) -> None:
        """Decode token by token until EOG, a stop sequence, max_tokens or cancellation."""
        from llama_cpp import llama_model_get_vocab, llama_vocab_is_eog

        s = request.sampling
        vocab = llama_model_get_vocab(llama.model)
        matcher = StopMatcher(s.stop)
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        count = 0
        finish: FinishReason = "length"
        llama.set_seed(s.seed)
        # The prompt is already in the KV cache with fresh logits, so generate() finds it
        # cached and samples the first token straight away.
        tokens = llama.generate(
            list(request.prompt.token_ids),
            top_k=s.top_k,
            top_p=s.top_p,
            min_p=s.min_p,
            temp=s.temperature,
            repeat_penalty=s.repeat_penalty,
            frequency_penalty=s.frequency_penalty,
            presence_penalty=s.presence_penalty,
        )
        try:
            while count < s.max_tokens:
                token = next(tokens)
                if cancel.is_set():
                    return
                if llama_vocab_is_eog(vocab, token):
                    finish = "stop"
                    break
                count += 1
                self.generated_tokens += 1
                text = matcher.feed(utf8.decode(llama.detokenize([token])))
                if text:
                    emit(GenerationChunk(text))
                if matcher.stopped:
                    finish = "stop"
                    break
        finally:
            tokens.close()
        tail = matcher.feed(utf8.decode(b"", final=True)) + matcher.flush()
        emit(
            GenerationChunk(
                tail,
                finish_reason=finish,
                prompt_tokens=len(request.prompt.token_ids),
                completion_tokens=count,
            )
        )

    async def abort(self, request_id: str) -> None:
        cancel = self._cancels.get(request_id)
        if cancel is not None:
            cancel.set()

    async def health(self) -> Health:
        return Health(
            ready=self._llama is not None and not self._closed,
            running=len(self._cancels),
            waiting=self._waiting,
        )


def _token_text(llama: Llama, token: int) -> str:
    return "" if token < 0 else llama.detokenize([token], special=True).decode("utf-8", "replace")


def _tokenize(llama: Llama, text: str, special: bool) -> Prompt:
    ids = llama.tokenize(text.encode("utf-8"), add_bos=True, special=special)
    bos = llama.token_bos()
    if len(ids) >= 2 and ids[0] == ids[1] == bos:
        ids = ids[1:]  # the template wrote its own BOS and llama.cpp added another
    return Prompt(text, tuple(ids))
