"""Token choice beyond a plain sampler chain: grammar-constrained sampling and logprobs.

Used by the scheduler (:mod:`medserve.engines.batching`) on its thread, over the logits of
its llama.cpp context, right after each ``llama_decode``.

Constrained sampling follows llama.cpp's own ``common_sampler_sample``: the chain samples
as if free, the grammar checks that one token, and only when it refuses is the chain run
again over the vocabulary with the grammar applied first. Measured on SmolLM2's 49,152
tokens with a form-sized schema (2 shared cores, under load): checking one token 5-8 us,
applying the grammar to the whole vocabulary 5 ms (between values) to 17 ms (inside a
string) per token, as much as or more than a decode step; tests/bench/structured.py
compares the two end to end. Greedy answers are identical to
the grammar inside the chain (``Llama._init_sampler``'s order: penalties, grammar,
greedy): greedy takes the first most likely token, and if the grammar allows it, it is
also the first most likely allowed one. Seeded random answers come from the same
distribution, not the same draws.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import numpy as np

from medserve.engines.base import TokenLogprob


class Picker:
    """Constrained sampling and log-probabilities over one llama.cpp context's logits.

    ``piece(token)`` gives a token's text bytes (empty for control tokens); ``eog`` is the
    set of end-of-generation tokens (never fed to a grammar: a complete grammar allows
    them and has nothing to advance).
    """

    def __init__(
        self, ctx: Any, n_vocab: int, eog: frozenset[int], piece: Callable[[int], bytes]
    ) -> None:
        self._ctx = ctx
        self._n_vocab = n_vocab
        self._eog = eog
        self._piece = piece
        # Candidates in llama_token_data's layout, refilled for each constrained sample.
        self._candidates = np.zeros(
            n_vocab, dtype=np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")])
        )
        self._ids = np.arange(n_vocab, dtype=np.int32)

    def logits(self, index: int) -> np.ndarray[Any, np.dtype[np.float32]]:
        """The raw logits of batch position ``index`` (a view, valid until the next decode)."""
        from llama_cpp import llama_get_logits_ith

        pointer = llama_get_logits_ith(self._ctx, index)
        return np.ctypeslib.as_array(pointer, shape=(self._n_vocab,))

    def constrained(self, chain: Any, grammar: Any, index: int) -> int:
        """A token for batch position ``index`` from sampler ``chain`` that ``grammar``
        allows; both then accept it (the penalties' history, the grammar's state)."""
        from llama_cpp import (
            llama_sampler_accept,
            llama_sampler_apply,
            llama_token_data,
            llama_token_data_array,
        )

        logits = self.logits(index)
        cand = self._candidates
        data = cand.ctypes.data_as(ctypes.POINTER(llama_token_data))

        def fresh() -> Any:
            cand["id"] = self._ids
            cand["logit"] = logits
            cand["p"] = 0.0
            return llama_token_data_array(data, self._n_vocab, -1, False)

        cur = fresh()
        llama_sampler_apply(chain, ctypes.byref(cur))
        token = int(cur.data[cur.selected].id)
        if not self.allows(grammar, token):
            cur = fresh()
            llama_sampler_apply(grammar, ctypes.byref(cur))
            llama_sampler_apply(chain, ctypes.byref(cur))
            token = int(cur.data[cur.selected].id)
        llama_sampler_accept(chain, token)
        if token not in self._eog:
            llama_sampler_accept(grammar, token)
        return token

    @staticmethod
    def allows(grammar: Any, token: int) -> bool:
        """Whether ``grammar``, in its current state, allows ``token`` next."""
        from llama_cpp import llama_sampler_apply, llama_token_data, llama_token_data_array

        one = (llama_token_data * 1)(llama_token_data(token, 0.0, 0.0))
        cur = llama_token_data_array(one, 1, -1, False)
        llama_sampler_apply(grammar, ctypes.byref(cur))
        return bool(np.isfinite(one[0].logit))

    def logprob(self, index: int, token: int, top: int) -> TokenLogprob:
        """``token``'s natural-log probability under the raw logits at ``index`` (log-softmax
        in float64, before penalties, temperature, truncation and grammar), with the ``top``
        most likely tokens' (most likely first; ties in token order)."""
        logits = self.logits(index).astype(np.float64)
        peak = float(logits.max())
        total = peak + float(np.log(np.exp(logits - peak).sum()))
        best: tuple[TokenLogprob, ...] = ()
        if top:
            ids = np.argpartition(-logits, top - 1)[:top]
            ids = ids[np.lexsort((ids, -logits[ids]))]
            best = tuple(self._entry(int(i), float(logits[i]) - total) for i in ids)
        return self._entry(token, float(logits[token]) - total, best)

    def _entry(
        self, token: int, logprob: float, top: tuple[TokenLogprob, ...] = ()
    ) -> TokenLogprob:
        piece = self._piece(token)
        return TokenLogprob(piece.decode("utf-8", errors="replace"), piece, logprob, top)
