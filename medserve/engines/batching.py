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

Constrained requests (a JSON schema, a tool call) carry one llama.cpp grammar sampler per
sequence and share decode steps with free ones; :class:`~medserve.engines.picker.Picker`
applies it (sample as if free, check that token, resample with the grammar only when it
refuses: greedy answers equal the grammar inside the chain). When the grammar is complete
it allows only end-of-generation; a budget that ends first gives ``length``.

Log-probabilities (requests that ask) are the log-softmax of the raw logits of the sampled
position (before penalties, temperature, truncation and grammar: vLLM's default), with the
top alternatives, attached to the chunk that carries the token's text (see
:meth:`Scheduler._advance`).

Prefix reuse (:mod:`medserve.engines.prefix`): when a request's prefill begins, the KV of
its prompt's longest computed head is taken from wherever it is — left in this slot or
another free slot by an earlier request, held by a running request, or saved in the
host-memory store — and only the rest is prefilled. A slot's KV outlives its request (its
prompt's head stays until the slot is reused, and is saved to the store first when much of
it would be lost), so reuse costs no copy when the same slot serves the next request with
the same head, and one state copy otherwise. Greedy answers are identical with and without
reuse (the conditions are in :mod:`medserve.engines.prefix`).
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from medserve.engines.base import (
    FinishReason,
    GenerationChunk,
    PrefixCacheStats,
    Sampling,
    TokenLogprob,
)
from medserve.engines.picker import Picker
from medserve.engines.prefix import (
    BLOCK,
    Counters,
    Entry,
    PrefixStore,
    block_hashes,
    common_prefix,
    usable,
)
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
    salt: str | None = None  # the request's cache_salt: prefixes are shared between equals
    # A llama.cpp grammar sampler (llama_sampler_init_grammar) the tokens must follow, or
    # None. Owned by the scheduler once submitted: it frees it when the job is over.
    grammar: Any = None
    logprobs: int | None = None  # None: none; N: the sampled token's and N alternatives


@dataclass(frozen=True)
class _Held:
    """What a free slot's KV holds: exactly the first ``len(tokens)`` tokens' KV of a
    prompt sent with ``salt``."""

    salt: str | None = None
    tokens: tuple[int, ...] = ()


@dataclass(eq=False)
class _Slot:
    job: Job
    seq: int
    sampler: Any
    prompt: tuple[int, ...]
    matcher: StopMatcher
    utf8: codecs.IncrementalDecoder
    prefilled: int = 0
    n_past: int = 0
    count: int = 0
    next_token: int = -1
    started: bool = False  # its prefill began (its KV is its own prompt's from then on)
    grammar: Any = None  # the job's grammar sampler, applied beside the chain
    # Log-probabilities not yet sent: (start, end) of the token's text in the text fed to
    # the stop matcher, and the entry; ``fed``/``sent``: characters fed / sent so far.
    pending: deque[tuple[int, int, TokenLogprob]] = field(default_factory=deque)
    fed: int = 0
    sent: int = 0

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
        prefix_cache: bool = True,
        prefix_capacity: int = 0,
    ) -> None:
        """``prefix_cache``: reuse computed prompt heads; ``prefix_capacity``: bytes of host
        memory for saved ones (0: reuse only what the slots hold)."""
        from llama_cpp import (
            LLAMA_FLASH_ATTN_TYPE_DISABLED,
            llama_context_default_params,
            llama_get_memory,
        )
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
        # Off, so that a prompt chunk's KV does not depend on the chunk's size (with it on,
        # chunks under 64 tokens take another path: medserve.engines.prefix). Measured on
        # SmolLM2 at 2 threads, 8 sequences of 1,200 tokens: prefill within noise (248 vs
        # 258 tok/s), decoding not slower (87-109 vs 80-83 tok/s).
        params.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED
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
        self.prefix_cache = prefix_cache
        self.counters = Counters()
        self.store = PrefixStore(prefix_capacity, self.counters)
        self._held = [_Held() for _ in range(parallel)]
        self._picker = Picker(self._ctx.ctx, llama.n_vocab(), self._eog, self._piece)
        # Tests set this to put grammars inside the chain (Llama._init_sampler's way): the
        # reference the sample-then-check path must equal for greedy requests.
        self.grammar_in_chain = False

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
                    _free_grammar(item)
                    item.emit(ending)
                    item.emit(None)
                    item.on_release(False)
                elif isinstance(item, _Probe):
                    item.result.cancel()
            self._batch.close()
            self._ctx.close()

    def prefix_stats(self) -> PrefixCacheStats | None:
        """The prefix cache's counters (read from any thread); None when reuse is off."""
        if not self.prefix_cache:
            return None
        c, store = self.counters, self.store
        return PrefixCacheStats(
            hits=c.hits,
            misses=c.misses,
            prompt_tokens=c.prompt_tokens,
            reused_tokens=c.reused_tokens,
            bytes=store.bytes,
            capacity_bytes=store.capacity,
            entries=len(store),
            evictions=c.evictions,
        )

    def occupied_sequences(self) -> list[int]:
        """Sequence ids of free slots whose KV cells are not exactly the prompt head they
        keep for reuse: a leak (scheduler thread only; use :meth:`probe`)."""
        from llama_cpp import llama_memory_seq_pos_max, llama_memory_seq_pos_min

        running = {slot.seq for slot in self._slots}
        out = []
        for s in range(self.parallel):
            if s in running:
                continue
            kept = len(self._held[s].tokens)
            lo = llama_memory_seq_pos_min(self._memory, s)
            hi = llama_memory_seq_pos_max(self._memory, s)
            if (hi + 1, lo) != (kept, 0 if kept else -1):
                out.append(s)
        return out

    def kept_tokens(self) -> list[int]:
        """Per sequence, the prompt-head tokens its KV keeps for reuse (scheduler thread)."""
        return [len(h.tokens) for h in self._held]

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
        grammar, job.grammar = job.grammar, None
        if grammar is not None and self.grammar_in_chain:
            from llama_cpp import llama_sampler_chain_add

            llama_sampler_chain_add(sampler.sampler, grammar)  # the chain owns it now
            grammar = None
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
            seq=self._take_free(job),
            sampler=sampler,
            prompt=job.prompt,
            matcher=StopMatcher(s.stop),
            utf8=codecs.getincrementaldecoder("utf-8")(errors="replace"),
            grammar=grammar,
        )
        self._slots.append(slot)
        job.on_start()

    def _take_free(self, job: Job) -> int:
        """A free sequence for ``job``: the one keeping the longest head of its prompt, else
        the one freed longest ago (whose kept KV is the least likely to be wanted)."""
        if not self.prefix_cache:
            return self._free.pop()

        def shared(s: int) -> int:
            held = self._held[s]
            return common_prefix(held.tokens, job.prompt) if held.salt == job.salt else 0

        # _free is in release order (freed slots are appended), and max() keeps the first
        # of equals: on a tie, the slot freed longest ago.
        best = max(self._free, key=shared)
        self._free.remove(best)
        return best

    @staticmethod
    def _reusable(slot: _Slot) -> int:
        """How many of a started slot's prompt tokens have KV fit for reuse: those prefilled,
        less the last prompt token (evaluated alone when its chunk has one token)."""
        return min(slot.prefilled, len(slot.prompt) - 1)

    def _holding(self, seq: int) -> tuple[str | None, Sequence[int], int]:
        """What sequence ``seq``'s KV holds for reuse: (salt, tokens, how many of them)."""
        for slot in self._slots:
            if slot.seq == seq and slot.started:
                return slot.job.salt, slot.prompt, self._reusable(slot)
        held = self._held[seq]
        return held.salt, held.tokens, len(held.tokens)

    def _begin(self, slot: _Slot) -> None:
        """Before a slot's first prefill chunk: start it from the longest reusable head of
        its prompt (this slot's KV, another slot's, or a saved one), or from nothing."""
        from llama_cpp import llama_memory_seq_rm

        if not self.prefix_cache:
            slot.started = True
            return
        prompt, salt = slot.prompt, slot.job.salt
        best = _Reuse(0)
        # This slot first: reusing what it holds costs no copy, so any head is worth it
        # and it wins ties. A copy (of all a sequence's cells) must save a block at least.
        for seq in [slot.seq] + [s for s in range(self.parallel) if s != slot.seq]:
            held_salt, tokens, n = self._holding(seq)
            least = 1 if seq == slot.seq else BLOCK
            if held_salt == salt and n > best.tokens and n >= least:
                shared = min(common_prefix(tokens, prompt), n)
                if shared > best.tokens and shared >= least:
                    best = _Reuse(shared, seq=seq)
        found, entry = self.store.find(salt, prompt, block_hashes(salt, prompt))
        if found > best.tokens:
            best = _Reuse(found, entry=entry)
        slot.started = True  # from here on its KV is its own prompt's (see _holding)
        cut = usable(best.tokens, len(prompt), self.prefill_chunk)
        c = self.counters
        c.prompt_tokens += len(prompt)
        if cut and best.seq == slot.seq:
            self._spill(slot.seq, cut)
            llama_memory_seq_rm(self._memory, slot.seq, cut, -1)
        elif cut:
            self._spill(slot.seq, 0)
            if best.entry is not None:
                data = best.entry.data
                self.store.use(best.entry)
            else:
                assert best.seq is not None
                data = self._save(best.seq)
            if not self._restore(slot.seq, data):
                cut = 0
            llama_memory_seq_rm(self._memory, slot.seq, cut, -1)
        else:
            self._spill(slot.seq, 0)
            llama_memory_seq_rm(self._memory, slot.seq, -1, -1)
        self._held[slot.seq] = _Held()
        slot.prefilled = slot.n_past = cut
        if cut:
            c.hits += 1
            c.reused_tokens += cut
        else:
            c.misses += 1

    def _spill(self, seq: int, keep: int) -> None:
        """Before a slot's kept head is cut to ``keep`` tokens: save it to the store when that
        loses at least two blocks that no other slot or saved entry holds."""
        held = self._held[seq]
        if len(held.tokens) - keep < 2 * BLOCK or self.store.capacity == 0:
            return
        for other in range(self.parallel):
            salt, tokens, n = self._holding(other)
            same = other != seq and salt == held.salt and n >= len(held.tokens)
            if same and common_prefix(tokens, held.tokens) == len(held.tokens):
                return
        if not self.store.covers(held.salt, held.tokens):
            # The slot's cells are exactly the head (cut so at release): a compact copy.
            self.store.put(held.salt, held.tokens, self._save(seq))

    def _save(self, seq: int) -> bytes:
        """Sequence ``seq``'s KV as llama.cpp's per-sequence state (a copy, in host memory)."""
        from llama_cpp import llama_state_seq_get_data, llama_state_seq_get_size

        size = llama_state_seq_get_size(self._ctx.ctx, seq)
        buf = (ctypes.c_uint8 * size)()
        written = llama_state_seq_get_data(self._ctx.ctx, buf, size, seq)
        return ctypes.string_at(buf, written)

    def _restore(self, seq: int, data: bytes) -> bool:
        """Replace sequence ``seq``'s KV with a saved state; False (and ``seq`` empty) when
        llama.cpp refuses it."""
        from llama_cpp import llama_memory_seq_rm, llama_state_seq_set_data

        llama_memory_seq_rm(self._memory, seq, -1, -1)
        buf = ctypes.cast(ctypes.c_char_p(data), ctypes.POINTER(ctypes.c_uint8))
        if llama_state_seq_set_data(self._ctx.ctx, buf, len(data), seq) == 0:
            log.error("restoring a saved prefix failed", extra={"bytes": len(data)})
            llama_memory_seq_rm(self._memory, seq, -1, -1)
            return False
        return True

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
                _free_grammar(job)
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
            if not filling.started:
                self._begin(filling)
            # Chunks end at multiples of prefill_chunk whatever was reused, so the tokens
            # after a reused head are evaluated in the same chunks as without reuse.
            chunk = self.prefill_chunk
            end = min(len(filling.prompt), (filling.prefilled // chunk + 1) * chunk)
            take = end - filling.prefilled
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
                self._release(slot, EngineError("The engine failed while generating."), keep=False)
            return
        for slot, index in wanted:
            if slot.grammar is None:
                token = int(llama_sampler_sample(slot.sampler.sampler, self._ctx.ctx, index))
            else:
                token = self._picker.constrained(slot.sampler.sampler, slot.grammar, index)
            self._advance(slot, token, index)

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

    def _advance(self, slot: _Slot, token: int, index: int) -> None:
        """Handle one sampled token (from batch position ``index``): emit text, or finish.

        Log-probabilities go out with the chunk that sends the end of their token's text
        (a token that completes a character another began goes with it); the last chunk
        also takes the tokens whose text it sends only in part. Tokens of a matched stop
        sequence, whose text is never sent, get no entry; end-of-generation gets none.
        """
        finish: FinishReason | None = None
        if token in self._eog:
            finish = "stop"
        else:
            slot.count += 1
            self.generated_tokens += 1
            piece = slot.utf8.decode(self._piece(token))
            top = slot.job.logprobs
            if top is not None:
                start, slot.fed = slot.fed, slot.fed + len(piece)
                slot.pending.append((start, slot.fed, self._picker.logprob(index, token, top)))
            text = slot.matcher.feed(piece)
            if text:
                slot.sent += len(text)
                slot.job.emit(GenerationChunk(text, logprobs=self._sent(slot, False)))
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
        slot.sent += len(tail)
        final = GenerationChunk(
            tail,
            finish_reason=finish,
            prompt_tokens=len(slot.prompt),
            completion_tokens=slot.count,
            logprobs=self._sent(slot, True),
        )
        self._release(slot, final)

    @staticmethod
    def _sent(slot: _Slot, last: bool) -> tuple[TokenLogprob, ...]:
        """The pending log-probabilities whose token's text is now sent (all of it; in the
        last chunk, any of it); on the last chunk the rest (a stop sequence's) are dropped."""
        out = []
        while slot.pending:
            start, end, entry = slot.pending[0]
            if end <= slot.sent or (last and start < slot.sent):
                out.append(entry)
                slot.pending.popleft()
            else:
                break
        if last:
            slot.pending.clear()
        return tuple(out)

    def _release(self, slot: _Slot, last: Item, keep: bool = True) -> None:
        """Free the slot and its sampler, and tell the job it is over. With prefix reuse on
        (and ``keep``: its KV is sound), the KV of its prompt's head stays in the slot for
        later requests; every other cell is freed."""
        from llama_cpp import llama_memory_seq_rm

        if not self.prefix_cache or not keep:
            llama_memory_seq_rm(self._memory, slot.seq, -1, -1)
            self._held[slot.seq] = _Held()
        elif slot.started:
            # A slot whose prefill never began still holds its previous head, untouched.
            kept = self._reusable(slot)
            llama_memory_seq_rm(self._memory, slot.seq, kept, -1)
            self._held[slot.seq] = _Held(slot.job.salt, slot.prompt[:kept])
        slot.sampler.close()
        if slot.grammar is not None:
            from llama_cpp import llama_sampler_free

            llama_sampler_free(slot.grammar)
            slot.grammar = None
        self._slots.remove(slot)
        self._free.append(slot.seq)
        if last is not None:
            slot.job.emit(last)
        slot.job.emit(None)
        slot.job.on_release(True)


def _free_grammar(job: Job) -> None:
    """Free a job's grammar sampler that never reached a slot."""
    if job.grammar is not None:
        from llama_cpp import llama_sampler_free

        llama_sampler_free(job.grammar)
        job.grammar = None


def _end_of_generation_tokens(llama: Llama) -> frozenset[int]:
    """Every token id llama.cpp treats as end of generation (EOS, EOT, ...)."""
    from llama_cpp import llama_model_get_vocab, llama_vocab_is_eog

    vocab = llama_model_get_vocab(llama.model)
    return frozenset(t for t in range(llama.n_vocab()) if llama_vocab_is_eog(vocab, t))


@dataclass(frozen=True)
class _Reuse:
    """Where a prefill's reused head comes from (see :meth:`Scheduler._begin`)."""

    tokens: int
    seq: int | None = None  # a sequence holding it (this slot's own or another)
    entry: Entry | None = None  # or a saved one
