"""What quantization cost: perplexity and multiple-choice accuracy, original vs quantized.

The rule that makes the numbers comparable: text is tokenized **once**, by the HF
tokenizer, and every model scores those same token ids in the same chunks. For a GGUF the
llama.cpp tokenizer must first produce exactly those ids from the same text; when it does
not, that is a converter bug (wrong pre-tokenizer, missing special tokens), reported as
such and never folded into "quantization loss".

Perplexity: the held-out text's ids split into non-overlapping ``chunk``-token windows;
each window is scored from its second token on (the first has no context). This is not
llama.cpp's ``llama-perplexity`` convention (which scores only each window's second half),
so its numbers are comparable with each other, not with that tool's.

Multiple choice (MedQA/PubMedQA style): the question and lettered options, then
``Answer:``; each option letter is scored as a continuation and the most likely one is the
model's answer. The report counts items whose answer changed between the two models.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from medserve.quantize import QuantizeError
from medserve.quantize.progress import Stage

Logprobs = npt.NDArray[np.float64]


class Scorer(Protocol):
    def token_logprobs(self, ids: Sequence[int]) -> Logprobs:
        """log p(ids[i] | ids[:i]) for i = 1 .. len(ids) - 1."""
        ...


class HFScorer:
    """A transformers causal LM (the original, or a GPTQ checkpoint loaded back)."""

    def __init__(self, model: Any) -> None:
        self.model = model.eval()
        self.device = next(model.parameters()).device

    def token_logprobs(self, ids: Sequence[int]) -> Logprobs:
        import torch

        with torch.inference_mode():
            x = torch.tensor([list(ids)], device=self.device)
            logits = self.model(input_ids=x).logits[0, :-1].float()
            picked = torch.log_softmax(logits, dim=-1).gather(1, x[0, 1:].unsqueeze(1))
        return np.asarray(picked.squeeze(1).cpu().numpy(), dtype=np.float64)


class LlamaScorer:
    """A GGUF through llama.cpp itself (its kernels, not a dequantized copy)."""

    def __init__(self, path: Path, n_ctx: int, threads: int) -> None:
        from llama_cpp import Llama

        self.llm = Llama(
            model_path=str(path),
            n_ctx=n_ctx,
            n_batch=n_ctx,
            logits_all=True,
            n_threads=threads,
            verbose=False,
        )

    def token_logprobs(self, ids: Sequence[int]) -> Logprobs:
        self.llm.reset()  # type: ignore[no-untyped-call]
        self.llm.eval(list(ids))
        logits = np.asarray(self.llm.scores[: len(ids) - 1], dtype=np.float64)
        top = logits.max(axis=1, keepdims=True)
        norm = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
        picked = logits[np.arange(len(ids) - 1), np.asarray(ids[1:])]
        return np.asarray(picked - norm, dtype=np.float64)

    def close(self) -> None:
        self.llm.close()


@dataclass(frozen=True)
class EvalText:
    """The held-out text, tokenized once by the HF tokenizer."""

    name: str
    sha256: str
    text: str
    ids: tuple[int, ...]
    bos: bool
    chunk: int
    max_tokens: int

    def chunks(self) -> list[tuple[int, ...]]:
        ids = self.ids[: self.max_tokens]
        return [ids[i : i + self.chunk] for i in range(0, len(ids) - self.chunk + 1, self.chunk)]

    def describe(self) -> dict[str, Any]:
        return {
            "file": self.name,
            "sha256": self.sha256,
            "tokens": len(self.ids),
            "tokens_scored": len(self.chunks()) * (self.chunk - 1),
            "chunk": self.chunk,
            "chunks": len(self.chunks()),
            "bos": self.bos,
        }


def prepare_text(path: Path, tokenizer: Any, chunk: int, max_tokens: int) -> EvalText:
    raw = path.read_bytes()
    text = raw.decode("utf-8")
    ids = tuple(int(i) for i in tokenizer(text, add_special_tokens=True)["input_ids"])
    bos = tokenizer.bos_token_id is not None and len(ids) > 0 and ids[0] == tokenizer.bos_token_id
    prepared = EvalText(
        path.name, hashlib.sha256(raw).hexdigest(), text, ids, bos, chunk, max_tokens
    )
    if not prepared.chunks():
        raise QuantizeError(
            f"--eval-text {path.name}: {len(ids)} tokens, fewer than one {chunk}-token chunk"
        )
    return prepared


def llama_tokenize(path: Path, text: str, add_bos: bool) -> list[int]:
    """llama.cpp's token ids for ``text``, computed in a child process.

    A GGUF with a broken vocabulary can make llama.cpp's tokenizer throw a C++ exception
    (``std::out_of_range`` for a missing byte token), which aborts the whole process; in a
    child it becomes an error message instead.
    """
    cmd = [sys.executable, "-m", "medserve.quantize.evaluate", str(path), str(int(add_bos))]
    done = subprocess.run(
        cmd, input=text.encode("utf-8"), capture_output=True, timeout=600, check=False
    )
    if done.returncode != 0:
        raise QuantizeError(
            f"llama.cpp could not tokenize the evaluation text with {path.name} "
            f"(exit {done.returncode}): its vocabulary is broken. This is a conversion "
            "problem (the converter misread the tokenizer), not quantization loss"
        )
    ids: list[int] = json.loads(done.stdout)
    return ids


def check_tokenizer(text: EvalText, llama_ids: Sequence[int]) -> None:
    """Raise unless llama.cpp tokenized the evaluation text to exactly the HF ids."""
    if tuple(llama_ids) == text.ids:
        return
    first = next(
        (i for i, (a, b) in enumerate(zip(llama_ids, text.ids, strict=False)) if a != b),
        min(len(llama_ids), len(text.ids)),
    )
    raise QuantizeError(
        f"tokenizer mismatch: llama.cpp's tokenizer in the GGUF gives {len(llama_ids)} tokens, "
        f"the HF tokenizer {len(text.ids)}, first difference at token {first}. This is a "
        "conversion problem (pre-tokenizer or special tokens), not quantization loss; the "
        "GGUF would read prompts differently from the model that was trained"
    )


def perplexity(scorer: Scorer, text: EvalText, stage: Stage) -> dict[str, Any]:
    total = 0.0
    count = 0
    for chunk in text.chunks():
        logprobs = scorer.token_logprobs(chunk)
        if not np.all(np.isfinite(logprobs)):
            raise QuantizeError("the model produced non-finite scores on the evaluation text")
        total -= float(logprobs.sum())
        count += len(logprobs)
        stage.advance()
    return {"perplexity": round(math.exp(total / count), 4), "tokens": count}


@dataclass(frozen=True)
class Question:
    id: str
    prompt: str
    letters: tuple[str, ...]
    answer: str


LETTERS = "ABCDEFGHIJ"


def load_mcq(path: Path) -> list[Question]:
    """Parse a MedQA/PubMedQA-style JSONL file; errors name the line and field, never text.

    Each line: ``question``, ``options`` (an object letter -> text, or a list, lettered A,
    B, ...), ``answer`` (a letter, a 0-based index, or an option's exact text), and
    optionally ``id`` and ``context``.
    """
    items = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise QuantizeError(f"--eval-mcq: cannot read {path}: {type(exc).__name__}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            items.append(_question(json.loads(line), number))
        except json.JSONDecodeError:
            raise QuantizeError(f"--eval-mcq line {number}: not valid JSON") from None
    if not items:
        raise QuantizeError("--eval-mcq: the file holds no questions")
    return items


def _question(data: Any, number: int) -> Question:
    def bad(field: str) -> QuantizeError:
        return QuantizeError(f"--eval-mcq line {number}: missing or invalid `{field}`")

    if not isinstance(data, dict) or not isinstance(data.get("question"), str):
        raise bad("question")
    options = data.get("options")
    if isinstance(options, list):
        options = dict(zip(LETTERS, options, strict=False))
    if (
        not isinstance(options, dict)
        or not 2 <= len(options) <= len(LETTERS)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in options.items())
    ):
        raise bad("options")
    answer = data.get("answer")
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(options):
        answer = list(options)[answer]
    elif isinstance(answer, str) and answer not in options:
        answer = next((k for k, v in options.items() if v == answer), None)
    if not isinstance(answer, str) or answer not in options:
        raise bad("answer")
    context = data.get("context")
    if context is not None and not isinstance(context, str):
        raise bad("context")
    lines = [context, ""] if context else []
    lines.append(f"Question: {data['question']}")
    lines += [f"{k}. {v}" for k, v in options.items()]
    lines.append("Answer:")
    return Question(str(data.get("id", number)), "\n".join(lines), tuple(options), answer)


def mcq_answers(
    scorer: Scorer,
    encode: Callable[[str], list[int]],
    items: Sequence[Question],
    stage: Stage,
) -> list[str]:
    """Each question's most likely option letter (ties: the first)."""
    answers = []
    for item in items:
        prompt = encode(item.prompt)
        best, best_score = item.letters[0], -math.inf
        for letter in item.letters:
            ids = encode(f"{item.prompt} {letter}")
            shared = next(
                (i for i, (a, b) in enumerate(zip(prompt, ids, strict=False)) if a != b),
                min(len(prompt), len(ids)),
            )
            score = float(scorer.token_logprobs(ids)[max(shared, 1) - 1 :].sum())
            if score > best_score:
                best, best_score = letter, score
        answers.append(best)
        stage.advance()
    return answers


def mcq_report(
    items: Sequence[Question], original: Sequence[str], quantized: Sequence[str]
) -> dict[str, Any]:
    right_o = [a == q.answer for a, q in zip(original, items, strict=True)]
    right_q = [a == q.answer for a, q in zip(quantized, items, strict=True)]
    n = len(items)
    return {
        "items": n,
        "accuracy_original": round(sum(right_o) / n, 4),
        "accuracy_quantized": round(sum(right_q) / n, 4),
        "answers_changed": sum(a != b for a, b in zip(original, quantized, strict=True)),
        "right_to_wrong": sum(o and not q for o, q in zip(right_o, right_q, strict=True)),
        "wrong_to_right": sum(q and not o for o, q in zip(right_o, right_q, strict=True)),
        "changed_ids": [
            item.id for item, a, b in zip(items, original, quantized, strict=True) if a != b
        ],
    }


def longest(items: Sequence[Question], encode: Callable[[str], list[int]]) -> int:
    """Most tokens any scored MCQ sequence needs (for the llama.cpp context size)."""
    return max(len(encode(f"{q.prompt} {letter}")) for q in items for letter in q.letters)


def _tokenize_main() -> None:
    """Child of :func:`llama_tokenize`: GGUF path and BOS flag as arguments, text on stdin."""
    from llama_cpp import Llama

    from medserve.engines.vocab import Vocab

    path, bos = sys.argv[1], sys.argv[2] == "1"
    text = sys.stdin.buffer.read()
    llm = Llama(model_path=path, vocab_only=True, verbose=False)
    # Exact size, not llama-cpp-python's n_ctx_train guess (whose error message would
    # also carry the text).
    ids = Vocab(llm).tokenize(text, add_special=bos, special=False)
    sys.stdout.write(json.dumps(list(ids)))


if __name__ == "__main__":
    _tokenize_main()
