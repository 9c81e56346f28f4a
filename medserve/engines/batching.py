"""Continuous batching for llama.cpp: many sequences share one ``llama_decode`` per step.

llama-cpp-python's own server runs one request at a time behind a lock. This scheduler
keeps one loaded model and one llama.cpp context with ``parallel`` sequence slots, and on
every step decodes one token for each generating sequence plus a chunk of prompt for the
sequences still in prefill, all in a single batch. New requests take a free slot between
steps; finished, cancelled or timed-out ones leave and their KV cells are freed at once.

It runs on one dedicated thread that owns the llama.cpp context (contexts are not
thread-safe). Other threads talk to it only through its inbox: jobs to run, and probes
(small functions run between steps, used to inspect state safely).

Sampling uses llama.cpp's sampler chains, built exactly as ``Llama.generate`` builds them,
so a greedy request gives the same tokens here as through the library's own loop.
"""

from __future__ import annotations

import codecs
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from medserve.engines.base import FinishReason, GenerationChunk, Sampling
from medserve.engines.stops import StopMatcher
from medserve.engines.vocab import Vocab
from medserve.errors import EngineError, MedserveError, RequestTimeoutError, UnavailableError

if TYPE_CHECKING:
    from llama_cpp import Llama

log = logging.getLogger(__name__)

Item = GenerationChunk | BaseException | None
# Llama's own default for how many recent tokens the penalties look at.
PENALTY_LAST_N = 64
# While sequences are generating, a prompt chunk gets a step after this many decode steps:
# generating users keep most of the machine, and a new prompt still starts within a few
# steps. Two measured best of 1 and 2 at 8 users (tok/s and TTFT, tests/bench/compare.py).
DECODES_PER_PREFILL = 2


@dataclass(eq=False)
class Job:
    """One request handed to the scheduler, and how it reports back.

    ``emit`` receives chunks, then an exception or nothing, then ``None`` (always last).
    ``on_start`` fires when the job gets a slot; ``on_release(started)`` when it is over,
    whether it ran or was dropped from the queue.
    """

    prompt: tuple[int, ...]  # token ids, checked against the context by the engine
    sampling: Sampling
    max_tokens: int  # the completion budget (fits beside the prompt)
    emit: Callable[[Item], None]
    deadline: float
    on_start: Callable[[], None] = lambda: None
    on_release: Callable[[bool], None] = lambda started: None
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass(eq=False)
class _Slot:
    job: Job
    seq: int
    sampler: Any
    prompt: list[int]
    matcher: StopMatcher
    utf8: codecs.IncrementalDecoder
    prefilled: int = 0
    n_past: int = 0
    count: int = 0
    next_token: int = -1

    @property
    def decoding(self) -> bool:
        return self.prefilled == len(self.prompt)


class _Probe:
    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.result: Future[Any] = Future()


class Scheduler:
    """Owns a llama.cpp context with ``parallel`` sequences; call :meth:`run` on a thread."""

    def __init__(
        self,
        llama: Llama,
        *,
        parallel: int,
        slot_context: int,
        batch_size: int,
        threads: int,
        vocab: Vocab | None = None,
    ) -> None:
        from llama_cpp import llama_context_default_params, llama_get_memory
        from llama_cpp._internals import LlamaBatch, LlamaContext

        self._llama = llama
        self._vocab = vocab or Vocab(llama)
        self.parallel = parallel
        self.slot_context = slot_context
        self.batch_size = batch_size
        params = llama_context_default_params()
        params.n_ctx = slot_context * parallel
        params.n_batch = batch_size
        params.n_ubatch = batch_size
        params.n_seq_max = parallel
        params.n_threads = threads
        params.n_threads_batch = threads
        # One KV buffer per sequence: each gets slot_context cells and attention never
        # scans other requests' cells.
        params.kv_unified = False
        params.no_perf = True
        self._ctx = LlamaContext(model=llama._model, params=params, verbose=False)
        self._batch = LlamaBatch(n_tokens=batch_size, embd=0, n_seq_max=parallel, verbose=False)
        self._memory = llama_get_memory(self._ctx.ctx)
        # Per-token work stays in Python dicts and sets: every ctypes call releases and
        # retakes the GIL, and with the event loop busy each retake can wait a switch
        # interval, so the hot path makes as few of them as it can.
        self._eog = _end_of_generation_tokens(llama)
        self._pieces: dict[int, bytes] = {}
        # Prompt tokens per prefill step: bounded so a long prompt holds up the others'
        # next token by at most one chunk's evaluation.
        self.prefill_chunk = min(batch_size, 256)
        self._decode_steps = 0
        self._inbox: queue.SimpleQueue[Job | _Probe | None] = queue.SimpleQueue()
        self._free = list(range(parallel - 1, -1, -1))
        self._waiting: deque[Job] = deque()
        self._slots: list[_Slot] = []
        self.generated_tokens = 0
        self.prompt_tokens_evaluated = 0

    # -- called from other threads -------------------------------------------------------

    def submit(self, job: Job) -> None:
        self._inbox.put(job)

    def probe(self, fn: Callable[[], Any]) -> Future[Any]:
        """Run ``fn`` on the scheduler thread between two steps."""
        p = _Probe(fn)
        self._inbox.put(p)
        return p.result

    def stop(self) -> None:
        """Finish: cancel every job (queued or running) and end :meth:`run`."""
        self._inbox.put(None)

    # -- the scheduler thread ------------------------------------------------------------

    def run(self) -> None:
        ending: MedserveError = UnavailableError(
            "The server is shutting down.", code="shutting_down"
        )
        try:
            while self._admit():
                self._reap()
                if self._slots:
                    self._step()
        except Exception:
            # A bug here must not leave clients hanging: every job is ended below, and the
            # engine reports not ready from now on (its thread is gone).
            log.exception("scheduler failed")
            ending = EngineError("The engine failed while generating.")
        finally:
            for slot in list(self._slots):
                self._release(slot, ending)
            leftovers: list[Job | _Probe | None] = list(self._waiting)
            while True:
                try:
                    leftovers.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            for item in leftovers:
                if isinstance(item, Job):
                    item.emit(ending)
                    item.emit(None)
                    item.on_release(False)
                elif isinstance(item, _Probe):
                    item.result.cancel()
            self._batch.close()
            self._ctx.close()

    def occupied_sequences(self) -> list[int]:
        """Sequence ids that hold KV cells (scheduler thread only; use :meth:`probe`)."""
        from llama_cpp import llama_memory_seq_pos_max

        return [s for s in range(self.parallel) if llama_memory_seq_pos_max(self._memory, s) >= 0]

    def _admit(self) -> bool:
        """Read the inbox (blocking only when idle), then fill free slots in arrival order.

        Returns False when asked to stop.
        """
        while True:
            idle = not self._slots and not self._waiting
            try:
                item = self._inbox.get(block=idle)
            except queue.Empty:
                break
            if item is None:
                return False
            if isinstance(item, _Probe):
                try:
                    item.result.set_result(item.fn())
                except Exception as exc:
                    item.result.set_exception(exc)
                continue
            self._waiting.append(item)
        while self._free and self._waiting:
            self._start(self._waiting.popleft())
        return True

    def _start(self, job: Job) -> None:
        from llama_cpp._internals import LlamaSampler

        s = job.sampling
        sampler = LlamaSampler()
        sampler.add_penalties(
            self._llama.n_vocab(),
            PENALTY_LAST_N,
            s.repeat_penalty,
            s.frequency_penalty,
            s.presence_penalty,
        )
        # top_p 0 keeps only the most likely token (OpenAI's reading, and llama.cpp's top-p
        # with min_keep 1 would do the same): say so rather than rely on it.
        if s.temperature == 0.0 or s.top_p == 0.0:
            sampler.add_greedy()
        else:
            sampler.add_top_k(s.top_k)
            sampler.add_typical(1.0, 1)
            sampler.add_top_p(s.top_p, 1)
            sampler.add_min_p(s.min_p, 1)
            sampler.add_temp(s.temperature)
            sampler.add_dist(s.seed)
        slot = _Slot(
            job=job,
            seq=self._free.pop(),
            sampler=sampler,
            prompt=list(job.prompt),
            matcher=StopMatcher(s.stop),
            utf8=codecs.getincrementaldecoder("utf-8")(errors="replace"),
        )
        self._slots.append(slot)
        job.on_start()

    def _reap(self) -> None:
        """Drop cancelled and timed-out jobs, running or waiting, before the next step."""
        now = time.monotonic()
        for slot in list(self._slots):
            if slot.job.cancel.is_set():
                self._release(slot, None)
            elif now > slot.job.deadline:
                self._release(slot, RequestTimeoutError())
        for job in list(self._waiting):
            if job.cancel.is_set() or now > job.deadline:
                self._waiting.remove(job)
                if not job.cancel.is_set():
                    job.emit(RequestTimeoutError())
                job.emit(None)
                job.on_release(False)

    def _step(self) -> None:
        """One ``llama_decode``: either every generating sequence's next token, or one
        prompt chunk of one sequence (after ``DECODES_PER_PREFILL`` decode steps).

        Prompt chunks never share a batch with other sequences: with one KV buffer per
        sequence, llama.cpp splits a batch into micro-batches holding the same number of
        tokens from each sequence, so a 40-token prompt next to seven 1-token decodes runs
        as 40 tiny decodes (measured: 150-375 ms steps instead of about 50). Chunks have a
        fixed size, whatever the load, so a prompt is evaluated the same way alone or in
        company and greedy answers do not depend on what else is running.
        """
        from llama_cpp import llama_decode, llama_sampler_sample

        batch = self._batch.batch
        n = 0
        wanted: list[tuple[_Slot, int]] = []
        # In sequence-id order: with a batch whose sequences come out of order llama.cpp
        # decoded about a third slower (measured: rounds of 8 users alternated 155 and
        # 102 tok/s as freed ids were reused in reverse; sorted, 150 every round).
        decoding = sorted((s for s in self._slots if s.decoding), key=lambda s: s.seq)
        filling = next((s for s in self._slots if not s.decoding), None)
        if filling is not None and (not decoding or self._decode_steps >= DECODES_PER_PREFILL):
            take = min(self.prefill_chunk, len(filling.prompt) - filling.prefilled)
            for i in range(take):
                pos = filling.prefilled + i
                last = pos == len(filling.prompt) - 1
                self._add(batch, n, filling.prompt[pos], pos, filling.seq, last)
                if last:
                    wanted.append((filling, n))
                n += 1
            filling.prefilled += take
            filling.n_past = filling.prefilled
            self.prompt_tokens_evaluated += take
            self._decode_steps = 0
        else:
            for slot in decoding:
                self._add(batch, n, slot.next_token, slot.n_past, slot.seq, True)
                slot.n_past += 1
                wanted.append((slot, n))
                n += 1
            self._decode_steps += 1
        batch.n_tokens = n
        code = llama_decode(self._ctx.ctx, batch)
        if code != 0:
            log.error("llama_decode failed", extra={"status": code})
            for slot in list(self._slots):
                self._release(slot, EngineError("The engine failed while generating."))
            return
        for slot, index in wanted:
            token = llama_sampler_sample(slot.sampler.sampler, self._ctx.ctx, index)
            self._advance(slot, int(token))

    @staticmethod
    def _add(batch: Any, i: int, token: int, pos: int, seq: int, logits: bool) -> None:
        batch.token[i] = token
        batch.pos[i] = pos
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = seq
        batch.logits[i] = logits

    def _piece(self, token: int) -> bytes:
        """The token's bytes, whole at any length; control tokens give none (not rendered)."""
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self._vocab.piece(token, special=False)
        return piece

    def _advance(self, slot: _Slot, token: int) -> None:
        """Handle one sampled token: emit text, or finish the request."""
        finish: FinishReason | None = None
        if token in self._eog:
            finish = "stop"
        else:
            slot.count += 1
            self.generated_tokens += 1
            text = slot.matcher.feed(slot.utf8.decode(self._piece(token)))
            if text:
                slot.job.emit(GenerationChunk(text))
            if slot.matcher.stopped:
                finish = "stop"
            elif slot.count >= slot.job.max_tokens:
                finish = "length"
            elif slot.n_past >= self.slot_context:
                finish = "length"  # unreachable: validation keeps prompt + max_tokens in context
        if finish is None:
            slot.next_token = token
            return
        tail = slot.matcher.feed(slot.utf8.decode(b"", final=True)) + slot.matcher.flush()
        final = GenerationChunk(
            tail,
            finish_reason=finish,
            prompt_tokens=len(slot.prompt),
            completion_tokens=slot.count,
        )
        self._release(slot, final)

    def _release(self, slot: _Slot, last: Item) -> None:
        """Free the slot's KV cells and sampler, and tell the job it is over."""
        from llama_cpp import llama_memory_seq_rm

        llama_memory_seq_rm(self._memory, slot.seq, -1, -1)
        slot.sampler.close()
        self._slots.remove(slot)
        self._free.append(slot.seq)
        if last is not None:
            slot.job.emit(last)
        slot.job.emit(None)
        slot.job.on_release(True)


def _end_of_generation_tokens(llama: Llama) -> frozenset[int]:
    """Every token id llama.cpp treats as end of generation (EOS, EOT, ...)."""
    from llama_cpp import llama_model_get_vocab, llama_vocab_is_eog

    vocab = llama_model_get_vocab(llama.model)
    return frozenset(t for t in range(llama.n_vocab()) if llama_vocab_is_eog(vocab, t))
