"""The prefix cache's bookkeeping (no model): how much may be reused, lookups, the LRU store."""

from __future__ import annotations

import pytest

from medserve.engines.prefix import (
    BLOCK,
    Counters,
    PrefixStore,
    block_hashes,
    common_prefix,
    usable,
)

CHUNK = 256


@pytest.mark.parametrize(
    ("match", "length", "expected", "why"),
    [
        (0, 100, 0, "nothing shared"),
        (1, 100, 1, "one token, then a 99-token chunk"),
        (100, 100, 98, "all of it: the last token is evaluated, and not alone"),
        (99, 100, 98, "all but the last: that would be a one-token chunk"),
        (98, 100, 98, "two tokens left: a chunk like any other"),
        (256, 600, 256, "a chunk boundary: the rest exactly as from scratch"),
        (255, 600, 254, "one before a boundary would leave a one-token chunk"),
        (254, 600, 254, "two before a boundary"),
        (300, 600, 300, "mid-chunk"),
        (512, 513, 512, "the last token alone, as a fresh prefill has it too"),
        (511, 513, 510, "two left, but split by a boundary: [511] would be alone"),
        (600, 513, 512, "a longer match than the prompt"),
        (5, 1, 0, "a one-token prompt is evaluated whole"),
        (768, 769, 768, "a one-token last chunk, as from scratch"),
        (767, 769, 766, "one before a boundary, then a one-token last chunk"),
    ],
)
def test_usable(match: int, length: int, expected: int, why: str) -> None:
    assert usable(match, length, CHUNK) == expected, why


def test_usable_never_leaves_a_one_token_chunk_that_a_fresh_prefill_would_not() -> None:
    for length in range(1, 3 * CHUNK + 3):
        for match in range(length + 2):
            cut = usable(match, length, CHUNK)
            assert 0 <= cut <= min(match, length - 1)
            start = cut // CHUNK * CHUNK
            end = min(length, start + CHUNK)
            assert end - cut > 1 or end - start == 1


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ((), (1, 2), 0),
        ((1, 2, 3), (1, 2, 3), 3),
        ((1, 2, 3), (1, 2), 2),
        ((1, 9, 3), (1, 2, 3), 1),
        (tuple(range(200)), tuple(range(130)) + (-1,), 130),
        (tuple(range(200)), tuple(range(200)), 200),
    ],
)
def test_common_prefix(a: tuple[int, ...], b: tuple[int, ...], expected: int) -> None:
    assert common_prefix(a, b) == expected == common_prefix(b, a)


def test_block_hashes_chain_the_salt_and_every_earlier_block() -> None:
    tokens = tuple(range(3 * BLOCK + 10))
    h = block_hashes(None, tokens)
    assert len(h) == 3  # whole blocks only
    assert block_hashes(None, tokens[: 2 * BLOCK]) == h[:2]
    assert block_hashes("key-a", tokens)[0] != h[0]
    changed = (-1,) + tokens[1:]
    assert all(x != y for x, y in zip(block_hashes(None, changed), h, strict=True))


def seq(start: int, n: int) -> tuple[int, ...]:
    return tuple(range(start, start + n))


def test_store_finds_the_longest_head_and_checks_the_salt() -> None:
    store = PrefixStore(10_000, Counters())
    head = seq(0, 3 * BLOCK)
    assert store.put(None, head + seq(1000, 40), b"a" * 100)
    assert store.put(None, head[: 2 * BLOCK] + seq(5000, BLOCK), b"b" * 100)
    prompt = head + seq(1000, 20) + seq(9000, 5)
    found, entry = store.find(None, prompt, block_hashes(None, prompt))
    assert found == 3 * BLOCK + 20 and entry is not None and entry.data[:1] == b"a"
    assert store.find("other", prompt, block_hashes("other", prompt)) == (0, None)
    short = head[:10]
    assert store.find(None, short, block_hashes(None, short)) == (0, None)  # under a block


def test_store_drops_least_recently_used_first_and_counts_evictions() -> None:
    counters = Counters()
    store = PrefixStore(250, counters)
    a, b, c = seq(0, BLOCK), seq(1000, BLOCK), seq(2000, BLOCK)
    store.put(None, a, b"a" * 100)
    store.put(None, b, b"b" * 100)
    found, entry = store.find(None, a, block_hashes(None, a))
    assert entry is not None
    store.use(entry)  # a is now the most recent
    store.put(None, c, b"c" * 100)
    assert store.find(None, b, block_hashes(None, b)) == (0, None)
    assert store.find(None, a, block_hashes(None, a))[0] == BLOCK
    assert (len(store), store.bytes, counters.evictions) == (2, 200, 1)


def test_store_refuses_what_cannot_fit_and_replaces_heads_it_extends() -> None:
    store = PrefixStore(150, Counters())
    assert not store.put(None, seq(0, BLOCK), b"x" * 151)
    assert not store.put(None, seq(0, BLOCK - 1), b"x")  # under a block: not worth a copy
    assert store.put(None, seq(0, BLOCK), b"x" * 100)
    assert store.put(None, seq(0, 2 * BLOCK), b"y" * 120)  # holds the first one's tokens too
    assert (len(store), store.bytes) == (1, 120)
    assert store.covers(None, seq(0, BLOCK + 3))
    assert not store.covers(None, seq(0, 2 * BLOCK + 1))
