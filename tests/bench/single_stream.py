"""Single-stream decode speed: medserve over HTTP vs llama.cpp in-process, same prompt.

Both sides decode the same chat prompt greedily with the same sampler settings and the same
thread count; rounds alternate (in-process, HTTP, in-process, ...) so that a noisy
neighbour hits both, and the medians are compared. Decode tokens/s is measured from the
first generated token to the last, so prompt processing and connection set-up are not in it.

    .venv/bin/python tests/bench/single_stream.py [--rounds 5] [--max-tokens 128] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from llama_cpp import Llama, llama_model_get_vocab, llama_vocab_is_eog

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.conftest import AUTH, smollm2_path
from tests.serverproc import running_server
from tests.sse import DONE, iter_events

MODEL = "smollm2-135m-instruct"
MESSAGES = [
    {
        "role": "user",
        "content": "Explain how type 2 diabetes is diagnosed and managed, step by step.",
    }
]
SAMPLING = {"temperature": 0.0, "top_p": 1.0, "top_k": 40, "repeat_penalty": 1.3}


def in_process(llama: Llama, prompt_ids: list[int], max_tokens: int) -> tuple[float, int]:
    """Decode tokens/s of llama-cpp-python's own generate loop."""
    vocab = llama_model_get_vocab(llama.model)
    stamps = []
    gen = llama.generate(
        prompt_ids,
        temp=SAMPLING["temperature"],
        top_p=SAMPLING["top_p"],
        top_k=int(SAMPLING["top_k"]),
        min_p=0.0,
        repeat_penalty=SAMPLING["repeat_penalty"],
        reset=True,
    )
    for token in gen:
        if llama_vocab_is_eog(vocab, token):
            break
        llama.detokenize([token])
        stamps.append(time.perf_counter())
        if len(stamps) >= max_tokens:
            break
    gen.close()
    llama.reset()  # no prefix reuse between rounds: both sides prefill the whole prompt
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), len(stamps)


def over_http(url: str, max_tokens: int) -> tuple[float, int]:
    """Decode tokens/s seen by a streaming client of medserve."""
    body = {
        "model": MODEL,
        "messages": MESSAGES,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        **SAMPLING,
    }
    stamps: list[float] = []
    tokens = 0
    url = f"{url}/v1/chat/completions"
    with httpx.stream("POST", url, json=body, timeout=120, headers=AUTH) as r:
        for event in iter_events(r.iter_lines()):
            if event == DONE:
                continue
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event["choices"]:
                if choice["delta"].get("content"):
                    stamps.append(time.perf_counter())
    # Chunks can hold more than one token (held-back stop text, split UTF-8), so count
    # tokens from usage and time from the first to the last content chunk.
    return (tokens - 1) / (stamps[-1] - stamps[0]), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    threads = os.cpu_count() or 1
    llama = Llama(
        model_path=str(smollm2_path()),
        n_ctx=8192,
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    template = llama.metadata["tokenizer.chat_template"]
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    text = Jinja2ChatFormatter(template, "", "", add_generation_prompt=True)(
        messages=MESSAGES,  # type: ignore[arg-type]
    ).prompt
    prompt_ids = llama.tokenize(text.encode(), add_bos=True, special=True)

    rows: dict[str, list[float]] = {"in_process": [], "http": []}
    counts: dict[str, list[int]] = {"in_process": [], "http": []}
    with tempfile.TemporaryDirectory() as tmp, running_server(Path(tmp) / "serve.log") as server:
        over_http(server.url, 8)  # warm-up
        in_process(llama, prompt_ids, 8)
        for _ in range(args.rounds):
            rate, n = in_process(llama, prompt_ids, args.max_tokens)
            rows["in_process"].append(rate)
            counts["in_process"].append(n)
            rate, n = over_http(server.url, args.max_tokens)
            rows["http"].append(rate)
            counts["http"].append(n)
    medians = {k: statistics.median(v) for k, v in rows.items()}
    result = {
        "model": MODEL,
        "threads": threads,
        "rounds": args.rounds,
        "max_tokens": args.max_tokens,
        "tokens": counts,
        "decode_tok_s": rows,
        "median_tok_s": medians,
        "ratio_http_over_in_process": medians["http"] / medians["in_process"],
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"single-stream decode, {MODEL}, {threads} threads, {args.rounds} alternating rounds")
    for name, values in rows.items():
        shown = " ".join(f"{v:.1f}" for v in values)
        print(f"  {name:<11} median {medians[name]:6.1f} tok/s   rounds: {shown}")
    print(f"  ratio http / in-process: {result['ratio_http_over_in_process']:.3f}")


if __name__ == "__main__":
    main()
