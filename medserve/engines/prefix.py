"""Prefix KV reuse for the llama.cpp scheduler: finding computed prompt heads, keeping them.

A prompt's KV for its leading tokens depends only on those tokens, so a request whose
prompt starts like one already computed can start from that KV instead of prefilling it
again. The scheduler (:mod:`medserve.engines.batching`) looks in three places: the KV a
free slot still holds from its last request, the KV of a running request, and
:class:`PrefixStore`, a bounded host-memory store of saved sequences (llama.cpp's
per-sequence state, ``llama_state_seq_get_data``). Lookups go by chained hashes of
:data:`BLOCK`-token blocks, then token by token, so a long common head is found however
the tails differ. Requests share prefixes only when their ``salt`` (the request's
``cache_salt``) is equal.

Greedy answers stay bit-identical with and without reuse only if every token's KV is
computed the way a fresh prefill computes it. Measured on this CPU build (llama.cpp through
llama-cpp-python 0.3.36, SmolLM2): with flash attention off, a prompt chunk gives the same
KV and logits whatever its size and offset, except a chunk of one token (a different kernel
path: logits differ by up to 0.5); with flash attention on, chunks under 64 tokens differ
from larger ones (up to 0.7). So the scheduler runs with flash attention off, prefills in
chunks aligned to absolute positions (multiples of the chunk size), never reuses the last
prompt token (it must be evaluated for its logits anyway), and :func:`usable` shortens a
reuse that would leave a one-token chunk where a fresh prefill has a longer one.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

# Tokens per hashed block: lookups find a shared head to the block, then to the token.
BLOCK = 64


def block_hashes(salt: str | None, tokens: Sequence[int]) -> list[int]:
    """Chained hashes of ``tokens``' whole :data:`BLOCK`-token blocks: item k covers blocks
    0..k and the salt, so equal hashes mean (barring collisions) equal heads. Process-local
    (Python's ``hash``); a collision only costs a lookup, matches are checked token by token.
    """
    out: list[int] = []
    h = hash(("medserve-prefix", salt))
    for i in range(0, len(tokens) - BLOCK + 1, BLOCK):
        h = hash((h, tuple(tokens[i : i + BLOCK])))
        out.append(h)
    return out


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = min(len(a), len(b))
    i = 0
    while i + BLOCK <= n and a[i : i + BLOCK] == b[i : i + BLOCK]:
        i += BLOCK
    while i < n and a[i] == b[i]:
        i += 1
    return i


def usable(cut: int, length: int, chunk: int) -> int:
    """The most of a ``cut``-token match a ``length``-token prompt may reuse, when the rest
    is prefilled in ``chunk``-token chunks aligned to absolute positions.

    At most ``length - 1`` (the last prompt token is evaluated for its logits), and one less
    where the first chunk after the reuse would hold a single token while a fresh prefill's
    chunk there holds more (llama.cpp computes one-token batches differently; see the
    module docstring). 0 means start from scratch.
    """
    cut = min(cut, length - 1)
    if cut <= 0:
        return 0
    start = cut // chunk * chunk
    end = min(length, start + chunk)
    if end - cut == 1 and end - start > 1:
        cut -= 1
    return cut


@dataclass(eq=False)
class Entry:
    """A saved sequence: llama.cpp's state of a sequence holding exactly the KV of ``tokens``
    (positions 0..len-1), reusable by requests with the same ``salt``."""

    salt: str | None
    tokens: tuple[int, ...]
    data: bytes
    hashes: list[int] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.data)


@dataclass
class Counters:
    """What the scheduler and its store count (scheduler thread writes, others read)."""

    hits: int = 0
    misses: int = 0
    prompt_tokens: int = 0
    reused_tokens: int = 0
    evictions: int = 0


class PrefixStore:
    """Saved sequences in host memory, at most ``capacity`` bytes, least recently used
    dropped first. Scheduler thread only.

    Dropping an entry only frees its bytes: a request that restored from it has its own
    copy in its own slot, so eviction never touches a running sequence.
    """

    def __init__(self, capacity: int, counters: Counters) -> None:
        self.capacity = capacity
        self.bytes = 0
        self._counters = counters
        self._lru: OrderedDict[int, Entry] = OrderedDict()
        self._index: dict[int, dict[int, Entry]] = {}

    def __len__(self) -> int:
        return len(self._lru)

    def find(
        self, salt: str | None, tokens: Sequence[int], hashes: list[int]
    ) -> tuple[int, Entry | None]:
        """The longest head of ``tokens`` some entry holds (``hashes``: their
        :func:`block_hashes` with ``salt``): (tokens matched, entry), or (0, None)."""
        for k in range(len(hashes) - 1, -1, -1):
            found = self._index.get(hashes[k])
            if not found:
                continue
            best, entry = 0, None
            for e in found.values():
                if e.salt != salt:
                    continue
                n = common_prefix(e.tokens, tokens)
                if n > best:
                    best, entry = n, e
            if entry is not None:
                return best, entry
        return 0, None

    def use(self, entry: Entry) -> None:
        """Mark ``entry`` as just used (last to be dropped)."""
        if id(entry) in self._lru:
            self._lru.move_to_end(id(entry))

    def covers(self, salt: str | None, tokens: tuple[int, ...]) -> bool:
        """Whether some entry already holds all of ``tokens``."""
        n, entry = self.find(salt, tokens, block_hashes(salt, tokens))
        if entry is not None and n == len(tokens):
            self.use(entry)
            return True
        return False

    def put(self, salt: str | None, tokens: tuple[int, ...], data: bytes) -> bool:
        """Keep ``data`` (a sequence holding exactly ``tokens``), dropping entries it makes
        redundant (heads of it) and then the least recently used until under capacity.
        False when it does not fit at all (or it holds less than one block)."""
        if len(data) > self.capacity or len(tokens) < BLOCK:
            return False
        entry = Entry(salt, tokens, data, block_hashes(salt, tokens))
        heads = {id(e): e for h in entry.hashes for e in self._index.get(h, {}).values()}
        for e in heads.values():
            if (
                e.salt == salt
                and len(e.tokens) <= len(tokens)
                and tokens[: len(e.tokens)] == e.tokens
            ):
                self._drop(e)
        self._lru[id(entry)] = entry
        self.bytes += entry.size
        for h in entry.hashes:
            self._index.setdefault(h, {})[id(entry)] = entry
        while self.bytes > self.capacity:
            _, oldest = next(iter(self._lru.items()))
            self._drop(oldest)
            self._counters.evictions += 1
        return True

    def _drop(self, entry: Entry) -> None:
        del self._lru[id(entry)]
        self.bytes -= entry.size
        for h in entry.hashes:
            found = self._index.get(h)
            if found is not None:
                found.pop(id(entry), None)
                if not found:
                    del self._index[h]
