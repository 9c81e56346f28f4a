"""Side by side, in one run: medserve vs llama-cpp-python's server vs llama.cpp's server.

Same GGUF (the packaged SmolLM2), same prompts, same sampling (greedy, repeat_penalty 1.1),
same threads, same number of parallel slots where the server has slots. Servers run one at
a time, each as its own process on a loopback port, and are driven by ``medserve bench``'s
load generator (streaming, so TTFT is measured). Prints aggregate output tokens/s and TTFT
p50 at each concurrency, and the ratios medserve / other.

    .venv/bin/pip install -e '.[bench]'
    .venv/bin/python tests/bench/compare.py [--threads 2] [--parallel 8] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from medserve import bench
from tests.conftest import AUTH, DEV_KEY, smollm2_path
from tests.serverproc import free_port, running_process

HERE = Path(__file__).resolve().parent
# cache_prompt=false: llama.cpp's server would otherwise reuse the KV of a repeated prompt;
# this run compares prefill and decoding, so medserve runs with its prefix cache off too
# ("medserve"), and once more as deployed ("medserve, prefix cache"). The shared-preamble
# workload, where reuse is the point, is tests/bench/prefix.py. The others ignore it.
OFFLINE = {"HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1"}
EXTRA = {"repeat_penalty": 1.1, "top_k": 40, "top_p": 1.0, "cache_prompt": False}


def servers(args: argparse.Namespace, tmp: Path) -> dict[str, tuple[list[str], str, str]]:
    """name -> (command, model id to send, readiness path)."""
    gguf = str(smollm2_path())
    py = sys.executable
    out: dict[str, tuple[list[str], str, str]] = {}
    for name, cache in (("medserve", "false"), ("medserve, prefix cache", "true")):
        config = tmp / f"medserve-{cache}.toml"
        config.write_text(
            f'[[models]]\nid = "smollm2"\npath = "{gguf}"\ncontext_length = {args.ctx}\n'
            f"parallel = {args.parallel}\nthreads = {args.threads}\nmax_queue = 256\n"
            f"prefix_cache = {cache}\n"
        )
        out[name] = (
            [py, "-m", "medserve", "serve", "--config", str(config), "--log-level", "warning"],
            "smollm2",
            "/ready",
        )
    if importlib.util.find_spec("llama_cpp.server") and importlib.util.find_spec(
        "starlette_context"
    ):
        out["llama-cpp-python server"] = (
            [
                py,
                "-m",
                "llama_cpp.server",
                "--model",
                gguf,
                "--n_threads",
                str(args.threads),
                "--n_threads_batch",
                str(args.threads),
                "--n_ctx",
                str(args.ctx),
                "--interrupt_requests",
                "False",
                "--verbose",
                "False",
            ],
            "smollm2",
            "/v1/models",
        )
    if importlib.util.find_spec("xllamacpp"):
        out["llama.cpp server (xllamacpp)"] = (
            [
                py,
                str(HERE / "xllamacpp_server.py"),
                gguf,
                "{port}",
                str(args.parallel),
                str(args.threads),
                str(args.ctx),
            ],
            "smollm2",
            "/health",
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--ctx", type=int, default=2048, help="context per slot")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--levels", default="1,4,8")
    parser.add_argument("--per-user", type=int, default=4, help="requests per concurrent user")
    parser.add_argument("--rounds", type=int, default=1, help="rounds; medians are reported")
    parser.add_argument("--servers", default="", help="comma-separated name prefixes to run")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    prompts = list(bench.DEFAULT_PROMPTS)
    runs: dict[str, dict[int, list[bench.Report]]] = {}
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        chosen = {
            name: spec
            for name, spec in servers(args, tmp).items()
            if not args.servers or any(name.startswith(p) for p in args.servers.split(","))
        }
        # Rounds alternate the servers, so a noisy neighbour hits all of them alike.
        for _ in range(args.rounds):
            for name, (cmd, model, probe) in chosen.items():
                port = free_port()
                full = [c.replace("{port}", str(port)) for c in cmd]
                if "xllamacpp" not in name:
                    full += ["--host", "127.0.0.1", "--port", str(port)]
                url = f"http://127.0.0.1:{port}"
                log = tmp / f"{name.split()[0]}.log"
                env = {**OFFLINE, "MEDSERVE_AUDIT__PATH": str(tmp / "audit" / "audit.db")}
                env["MEDSERVE_AUTH__DEV_KEY"] = DEV_KEY  # the other servers ignore the key
                with running_process(full, log, url + probe, env, AUTH):
                    warm = bench.run(
                        url,
                        model,
                        concurrency=1,
                        requests=2,
                        max_tokens=8,
                        prompts=prompts,
                        stream=True,
                        extra_body=EXTRA,
                        api_key=DEV_KEY,
                    )
                    asyncio.run(warm)
                    for c in levels:
                        report = asyncio.run(
                            bench.run(
                                url,
                                model,
                                concurrency=c,
                                requests=c * args.per_user,
                                max_tokens=args.max_tokens,
                                prompts=prompts,
                                stream=True,
                                extra_body=EXTRA,
                                time_limit_s=600,
                                api_key=DEV_KEY,
                            )
                        )
                        runs.setdefault(name, {}).setdefault(c, []).append(report)
    if args.json:
        print(
            json.dumps(
                {n: {c: [r.as_dict() for r in rs] for c, rs in v.items()} for n, v in runs.items()},
                indent=2,
            )
        )
        return

    def tput(name: str, c: int) -> float:
        return statistics.median(r.output_tokens_per_s for r in runs[name][c])

    def ttft(name: str, c: int) -> float:
        return statistics.median(r.ttft_s.get("p50", 0.0) for r in runs[name][c])

    print(
        f"SmolLM2-135M Q4_1, threads={args.threads}, slots={args.parallel}, "
        f"max_tokens={args.max_tokens}, greedy, streaming, medians of {args.rounds} round(s)"
    )
    print(f"{'server':<30} {'c':>3} {'ok':>9} {'tok/s':>8} {'TTFT p50':>10}  rounds tok/s")
    for name, per in runs.items():
        for c, reports in per.items():
            ok = sum(r.completed for r in reports)
            sent = sum(r.requests for r in reports)
            each = " ".join(f"{r.output_tokens_per_s:.1f}" for r in reports)
            print(
                f"{name:<30} {c:>3} {ok:>4}/{sent:<4} {tput(name, c):>8.1f} "
                f"{ttft(name, c) * 1000:>8.0f}ms  {each}"
            )
    if "medserve" not in runs:
        return
    for name in runs:
        if name == "medserve":
            continue
        for c in levels:
            ratio = tput("medserve", c) / max(tput(name, c), 1e-9)
            t_ratio = ttft("medserve", c) / max(ttft(name, c), 1e-9)
            print(f"medserve / {name:<28} c={c}: throughput x{ratio:.2f}, TTFT p50 x{t_ratio:.2f}")


if __name__ == "__main__":
    main()
