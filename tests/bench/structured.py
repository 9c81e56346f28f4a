"""Constrained (JSON schema) vs free decoding on SmolLM2: tokens/s at 1 and 8 concurrent.

medserve's llama.cpp engine in-process (the web layer adds the same to both), three ways:
free; constrained as served (sample as if free, check the token against the grammar,
resample with the grammar only when it refuses); constrained with the grammar applied to
the whole vocabulary at every token (the grammar inside the sampler chain, as
``Llama._init_sampler`` does it). Then llama.cpp's own server (xllamacpp, when installed)
free and with the same schema as ``response_format``. One run each; ratios constrained /
free. Greedy, repeat_penalty 1.1, the same extraction prompts everywhere.

    .venv/bin/python tests/bench/structured.py [--threads 2] [--max-tokens 160]

Measured 2026-11-30 (2 shared cores, load ~2, --max-tokens 96 --per-user 1), tok/s c=1/c=8:
medserve free 81.6/109.5, constrained 60.9/86.6 (x0.75/x0.79), grammar in chain 52.4/67.0
(x0.64/x0.61); llama.cpp server free 84.1/138.8, constrained 70.6/112.6 (x0.84/x0.81).
Free answers are prose and constrained ones JSON, so the ratios also hold a token-mix
difference; one run on a shared machine: expect +-20%.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from medserve import bench
from medserve.config import ModelSpec
from medserve.engines.base import Constraint, GenerationRequest, Message, Sampling
from medserve.engines.llamacpp import LlamaCppEngine
from tests.conftest import AUTH, smollm2_path
from tests.serverproc import free_port, running_process

HERE = Path(__file__).resolve().parent
LETTERS = [
    "Discharge letter: 67-year-old woman with community-acquired pneumonia and type 2 "
    "diabetes, treated with amoxicillin. Extract the data as JSON.",
    "Discharge letter: 45-year-old man after appendectomy, no complications, paracetamol "
    "for pain. Extract the data as JSON.",
    "Discharge letter: 80-year-old woman with heart failure and atrial fibrillation, "
    "started on apixaban. Extract the data as JSON.",
    "Discharge letter: 30-year-old man with asthma exacerbation, prednisolone for five "
    "days. Extract the data as JSON.",
]
SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "sex": {"enum": ["female", "male", "unknown"]},
        "diagnoses": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "maxLength": 40},
                    "confidence": {"type": "integer", "minimum": 0, "maximum": 100},
                },
                "required": ["name", "confidence"],
            },
            "minItems": 1,
            "maxItems": 4,
        },
        "medications": {"type": "array", "items": {"type": "string", "maxLength": 30}},
    },
    "required": ["age", "sex", "diagnoses", "medications"],
}


def sampling(max_tokens: int) -> Sampling:
    return Sampling(
        max_tokens=max_tokens,
        temperature=0.0,
        top_p=1.0,
        top_k=40,
        min_p=0.0,
        repeat_penalty=1.1,
        frequency_penalty=0.0,
        presence_penalty=0.0,
        seed=1,
    )


async def engine_run(
    engine: LlamaCppEngine, concurrency: int, requests: int, constraint: Constraint | None, n: int
) -> tuple[float, int]:
    """(output tokens/s, tokens) for ``requests`` requests, ``concurrency`` at a time."""
    issued = 0
    tokens = 0

    async def worker() -> None:
        nonlocal issued, tokens
        while issued < requests:
            i = issued
            issued += 1
            req = GenerationRequest(
                f"b{i}",
                "m",
                sampling(n),
                messages=(Message("user", LETTERS[i % len(LETTERS)]),),
                constraint=constraint,
            )
            async for chunk in engine.generate(req):
                if chunk.finish_reason is not None:
                    tokens += chunk.completion_tokens or 0

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return tokens / (time.perf_counter() - start), tokens


async def medserve_rows(args: argparse.Namespace) -> dict[str, dict[int, float]]:
    spec = ModelSpec.model_validate(
        {
            "id": "m",
            "path": smollm2_path(),
            "context_length": 1024,
            "parallel": 8,
            "threads": args.threads,
            "prefix_cache": False,
        }
    )
    engine = LlamaCppEngine(spec)
    await engine.start()
    text = json.dumps(SCHEMA, sort_keys=True, separators=(",", ":"))
    constraint = Constraint(kind="json_schema", schema=text, name="letter")
    rows: dict[str, dict[int, float]] = {}
    try:
        await engine_run(engine, 1, 1, constraint, 8)  # warm up
        scheduler = engine._scheduler
        assert scheduler is not None
        for name, c, in_chain in (
            ("medserve free", None, False),
            ("medserve constrained", constraint, False),
            ("medserve grammar in chain", constraint, True),
        ):
            scheduler.grammar_in_chain = in_chain
            for level in args.levels:
                tps, _ = await engine_run(engine, level, level * args.per_user, c, args.max_tokens)
                rows.setdefault(name, {})[level] = tps
                print(f"{name} c={level}: {tps:.1f} tok/s", flush=True)
        scheduler.grammar_in_chain = False
    finally:
        await engine.close()
    return rows


def llamacpp_rows(args: argparse.Namespace) -> dict[str, dict[int, float]]:
    if not importlib.util.find_spec("xllamacpp"):
        print("xllamacpp not installed: llama.cpp's server column skipped")
        return {}
    rows: dict[str, dict[int, float]] = {}
    constrained = {
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "letter", "schema": SCHEMA},
        }
    }
    base = {"repeat_penalty": 1.1, "top_k": 40, "top_p": 1.0, "cache_prompt": False}
    with tempfile.TemporaryDirectory() as t:
        port = free_port()
        cmd = [
            sys.executable,
            str(HERE / "xllamacpp_server.py"),
            str(smollm2_path()),
            str(port),
            "8",
            str(args.threads),
            "1024",
        ]
        url = f"http://127.0.0.1:{port}"
        with running_process(cmd, Path(t) / "server.log", url + "/health", {}, AUTH):
            for name, extra in (
                ("llama.cpp server free", base),
                ("llama.cpp server constrained", {**base, **constrained}),
            ):
                for level in args.levels:
                    report = asyncio.run(
                        bench.run(
                            url,
                            "smollm2",
                            concurrency=level,
                            requests=level * args.per_user,
                            max_tokens=args.max_tokens,
                            prompts=LETTERS,
                            stream=True,
                            extra_body=extra,
                            time_limit_s=600,
                        )
                    )
                    if report.completed < report.requests:
                        print(f"{name} c={level}: {report.completed}/{report.requests} completed")
                    rows.setdefault(name, {})[level] = report.output_tokens_per_s
                    print(f"{name} c={level}: {report.output_tokens_per_s:.1f} tok/s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--per-user", type=int, default=2, help="requests per concurrent user")
    parser.add_argument("--levels", default="1,8")
    args = parser.parse_args()
    args.levels = [int(x) for x in args.levels.split(",")]
    rows = asyncio.run(medserve_rows(args))
    rows.update(llamacpp_rows(args))
    print(
        f"SmolLM2-135M Q4_1, threads={args.threads}, max_tokens={args.max_tokens}, greedy, "
        "one run; output tokens/s"
    )
    print(f"{'':<30}" + "".join(f"{f'c={c}':>10}" for c in args.levels))
    for name, per in rows.items():
        print(f"{name:<30}" + "".join(f"{per.get(c, 0.0):>10.1f}" for c in args.levels))
    for free, other in (
        ("medserve free", "medserve constrained"),
        ("medserve free", "medserve grammar in chain"),
        ("llama.cpp server free", "llama.cpp server constrained"),
    ):
        if free in rows and other in rows:
            ratios = " ".join(
                f"c={c}: x{rows[other][c] / max(rows[free][c], 1e-9):.2f}" for c in args.levels
            )
            print(f"{other} / free: {ratios}")


if __name__ == "__main__":
    main()
