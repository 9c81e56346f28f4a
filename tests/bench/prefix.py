"""Shared-prefix workload, in one run: medserve vs llama.cpp's server, prompt cache on and off.

Hospital apps send the same long preamble every time (the institution's rules, a guideline
excerpt) followed by a short varying question. Every request here is a system message of
``--preamble-tokens`` tokens (deterministic synthetic text, no patient data; counted with
the GGUF's own tokenizer) and a user question that no other request of the run repeats,
answered greedily (temperature 0, repeat_penalty 1.1 as in compare.py) with at most
``--max-tokens`` tokens, streamed, so time to first token (TTFT) and inter-token latency
(ITL) are measured client-side by :func:`medserve.bench.run` (httpx).

Servers, all with the packaged SmolLM2 GGUF, the same threads, slots and context per slot,
each its own process on a loopback port, started together and kept up for the whole run:

- ``medserve``: its default settings (the prefix cache once the engine has one);
- ``medserve-nocache``: the registry entry says ``prefix_cache = false``; skipped, with a
  note, when this build's llama.cpp replica does not accept that key;
- ``llamacpp``: llama.cpp's server (xllamacpp, :mod:`tests.bench.xllamacpp_server`) with
  its prompt cache as it comes (``cache_prompt`` on, host-memory cache ``cache_ram_mib``);
- ``llamacpp-nocache``: the same server, every request with ``"cache_prompt": false`` in
  its body (llama.cpp's per-request switch: the prompt is evaluated from position 0).

Each server first answers one warm-up request: it computes the preamble cold, and its TTFT
is reported as "cold TTFT", apart; it is not in the measured set. Then ``--rounds`` rounds,
the order of the servers rotating from round to round so that a noisy neighbour hits all
alike; in a round each server gets ``--seq`` sequential requests at 1 user and
``--per-user`` requests per user at each other level of ``--users`` (all users start
together; closed loop). The cache-off rows are references for the cost of a cold prefill,
only at ``--off-users`` with ``--off-seq`` requests per round (prefills of ~10 s each on two
cores). The table shows, per server and users, medians over the rounds of requests/s, TTFT
p50 and p90 and ITL p50, then the issue's targets: medserve's TTFT p50 / llama.cpp's (cache
on) at 1 and 8 users (target <= 1) and medserve's requests/s / llama.cpp's (cache on) at 8
users (target >= 1.5). The last line is the whole result as one JSON object.

llama.cpp's server keeps a prompt per slot: in its first round at 8 users the slots that do
not hold the preamble yet prefill it (measured: TTFT p50 ~20 s, then ~1 s in later rounds).
With an odd number of rounds (default 3) the median is one round's value, a warm one.

    .venv/bin/python tests/bench/prefix.py [--rounds 3] [--users 1,8] [--seq 3]
        [--per-user 1] [--threads 2] [--parallel 8] [--ctx 2048] [--servers medserve,llamacpp]

About 5-6 minutes with the defaults on a 2-core machine once medserve reuses prefixes
(more while it does not: then each of its requests prefills the whole preamble).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from pydantic import ValidationError

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from medserve import bench
from medserve.config import ModelSpec
from tests.conftest import AUTH, DEV_KEY, smollm2_path
from tests.serverproc import ROOT, STARTUP_TIMEOUT_S, free_port

HERE = Path(__file__).resolve().parent
MODEL = "smollm2"
OFFLINE = {"HF_HUB_OFFLINE": "1", "DO_NOT_TRACK": "1"}
# The sampling of compare.py, sent to every server alike (greedy: temperature 0 per request).
SAMPLING: dict[str, Any] = {"repeat_penalty": 1.1, "top_k": 40, "top_p": 1.0}
REFERENCE = "llamacpp"  # the targets are ratios to this row
STOP_WAIT_S = 30.0  # SIGTERM, then SIGKILL to the process group

# --- the workload: a synthetic hospital system prompt and distinct short questions ---

RULES = (
    "You are the clinical documentation assistant of Northfield General Hospital, a "
    "fictional 640-bed teaching hospital. This text is synthetic benchmark material: it "
    "contains no patient data and is not clinical advice.",
    "Answer staff questions about the hospital's rules and the guideline excerpt below. "
    "Be brief, factual and specific; quote the rule or step number you rely on.",
    "Never invent doses, thresholds or contact numbers that are not written here; say "
    "that the question must go to the responsible consultant or the on-call pharmacist.",
    "Never ask for, repeat or store names, dates of birth, hospital numbers or other "
    "identifiers; if a question contains them, answer without repeating them.",
    "Rule 1. Every escalation is documented in the electronic record within 30 minutes, "
    "with the time, the observation that triggered it and the name of the role informed.",
    "Rule 2. Verbal orders are accepted only in emergencies, read back in full, and "
    "countersigned by the prescriber within 12 hours.",
    "Rule 3. Two registered nurses check every intravenous controlled drug, insulin "
    "infusion and anticoagulant infusion at the bedside before it is started.",
    "Rule 4. Handover uses the SBAR structure (situation, background, assessment, "
    "recommendation) at every shift change and every transfer between wards.",
    "Rule 5. A patient who scores 5 or more on the early warning score, or 3 in a single "
    "parameter, is reviewed by a doctor within 30 minutes; 7 or more is an emergency call.",
    "Rule 6. Hand hygiene is performed before and after every patient contact, after "
    "removing gloves and after touching the patient's surroundings.",
    "Rule 7. Falls are reported on the incident form before the end of the shift, with a "
    "post-fall assessment and neurological observations when a head injury is possible.",
    "Rule 8. Allergies are confirmed with the patient or the record before any first dose; "
    "an unconfirmed allergy status is escalated to the prescriber, not assumed.",
)

GUIDELINE = (
    "Guideline excerpt: adult sepsis, recognition and the first hour (Northfield G-114, "
    "synthetic version 4.2).",
    "Step 1. Suspect sepsis in any adult with a suspected infection and an early warning "
    "score of 5 or more, new confusion, a systolic blood pressure of 90 mmHg or less, a "
    "respiratory rate of 25 per minute or more, or a new oxygen requirement.",
    "Step 2. Call the ward doctor at once; if no review happens within 30 minutes, call the "
    "critical care outreach team and document both calls.",
    "Step 3. Take blood cultures before antibiotics, unless that would delay antibiotics by "
    "more than 15 minutes; record the time of each culture on the sepsis form.",
    "Step 4. Measure venous or arterial lactate within 30 minutes of recognition; repeat it "
    "within two hours if the first value is 2 mmol/L or higher.",
    "Step 5. Give the first dose of the empirical antibiotic named in the local "
    "antimicrobial policy within one hour of recognition; check allergies first (Rule 8).",
    "Step 6. Start intravenous fluids as prescribed when the patient is hypotensive or the "
    "lactate is raised, and reassess after each bolus: blood pressure, heart rate, "
    "respiratory rate, oxygen saturation, mental state and urine output.",
    "Step 7. Monitor urine output hourly; fewer than 0.5 mL/kg/h for two consecutive hours "
    "is escalated to the ward doctor and documented.",
    "Step 8. Refer to critical care when hypotension persists after fluids, the lactate "
    "stays at 4 mmol/L or higher, or the early warning score does not fall within an hour.",
    "Step 9. Review the antimicrobial prescription within 48 hours with the microbiology "
    "results: stop, narrow, switch to oral or continue, and write the decision down.",
    "Documentation form S-7 (sepsis pathway): tick each step with the time it was done, "
    "the role who did it and, when a step was skipped, why; the form is filed in the "
    "record and audited monthly by the deteriorating-patient group.",
)

WARD_POLICIES = (
    "observations are repeated hourly for the first four hours after admission",
    "the nurse in charge reviews every open sepsis form at the start of each shift",
    "the outreach team is reached through the switchboard, not by direct line",
    "fluid balance charts are closed and totalled at midnight",
    "antibiotic delays of more than one hour are reported as incidents",
    "student nurses document observations but do not sign escalation entries",
    "the bedside sepsis trolley is checked daily and after each use",
    "pharmacy reviews every new intravenous antimicrobial on the next working day",
)

QUESTION_FORMS = (
    "Which rule or step applies to {topic} on ward {ward}?",
    "What must be documented about {topic} on ward {ward}, and by when?",
    "Who is informed first about {topic} on ward {ward}?",
    "What is the time limit for acting on {topic} on ward {ward}?",
)

TOPICS = (
    "a rising lactate",
    "a new oxygen requirement",
    "a missed antibiotic dose",
    "a fall during the night",
    "an early warning score of 6",
    "blood cultures taken after the antibiotic",
    "an unconfirmed penicillin allergy",
    "a delayed fluid bolus",
    "low urine output",
    "a verbal order for insulin",
)


def preamble(count: Callable[[str], int], target: int) -> str:
    """The shared system prompt: the rules and the guideline excerpt, then numbered ward
    policies (cycling through WARD_POLICIES) until ``count`` (tokens) reaches ``target``.
    Deterministic for a given tokenizer; bounded at 400 policies."""
    parts = [*RULES, *GUIDELINE, "Ward-specific policies:"]
    for i in range(400):
        if count("\n".join(parts)) >= target:
            break
        ward, item = divmod(i, len(WARD_POLICIES))
        parts.append(f"Ward {ward + 1}.{item + 1}: {WARD_POLICIES[item]}.")
    return "\n".join(parts)


def question(k: int) -> str:
    """The ``k``-th question; distinct for every ``k`` >= 0 (the ward number grows)."""
    form = QUESTION_FORMS[k % len(QUESTION_FORMS)]
    rest = k // len(QUESTION_FORMS)
    return form.format(topic=TOPICS[rest % len(TOPICS)], ward=rest // len(TOPICS) + 1)


# --- the servers ---


@dataclass
class ServerSpec:
    """How to start one server and what every request to it carries."""

    command: list[str]  # "{port}" is replaced by the port
    probe: str  # path that answers 200 once it is ready
    extra_body: dict[str, Any]
    reference: bool = False  # a cache-off row: fewer requests (see --off-users, --off-seq)
    env: dict[str, str] = field(default_factory=dict)


def toml_entry(entry: dict[str, Any]) -> str:
    """``[[models]]`` with ``entry``'s keys (str, int, bool values; strings JSON-quoted)."""
    lines = ["[[models]]"]
    for key, value in entry.items():
        if isinstance(value, bool):
            lines.append(f"{key} = {'true' if value else 'false'}")
        elif isinstance(value, int):
            lines.append(f"{key} = {value}")
        else:
            lines.append(f"{key} = {json.dumps(str(value))}")
    return "\n".join(lines) + "\n"


def servers(args: argparse.Namespace, tmp: Path) -> tuple[dict[str, ServerSpec], dict[str, str]]:
    """The servers to run (name -> spec) and the ones skipped (name -> why)."""
    gguf = str(smollm2_path())
    py = sys.executable
    entry: dict[str, Any] = {
        "id": MODEL,
        "path": gguf,
        "context_length": args.ctx,
        "parallel": args.parallel,
        "threads": args.threads,
        "max_queue": 256,
    }
    out: dict[str, ServerSpec] = {}
    skipped: dict[str, str] = {}

    def medserve(name: str, model: dict[str, Any], reference: bool) -> None:
        ModelSpec.model_validate(model)
        home = tmp / name
        home.mkdir()
        config = home / "medserve.toml"
        config.write_text(toml_entry(model))
        out[name] = ServerSpec(
            [py, "-m", "medserve", "serve", "--config", str(config), "--log-level", "warning"]
            + ["--host", "127.0.0.1", "--port", "{port}"],
            "/ready",
            dict(SAMPLING),
            reference,
            {
                "MEDSERVE_AUDIT__PATH": str(home / "audit" / "audit.db"),
                "MEDSERVE_AUTH__KEYS_PATH": str(home / "keys.db"),
                "MEDSERVE_AUTH__DEV_KEY": DEV_KEY,
            },
        )

    medserve("medserve", entry, reference=False)
    try:
        medserve("medserve-nocache", {**entry, "prefix_cache": False}, reference=True)
    except ValidationError:
        skipped["medserve-nocache"] = (
            "this medserve's llama.cpp replica does not accept `prefix_cache` "
            "(no prefix cache in this build: the `medserve` row is already cache-off)"
        )
    if importlib.util.find_spec("xllamacpp"):
        command = [py, str(HERE / "xllamacpp_server.py"), gguf, "{port}"]
        command += [str(args.parallel), str(args.threads), str(args.ctx)]
        out["llamacpp"] = ServerSpec(command, "/health", dict(SAMPLING))
        out["llamacpp-nocache"] = ServerSpec(
            command, "/health", {**SAMPLING, "cache_prompt": False}, reference=True
        )
    else:
        for name in ("llamacpp", "llamacpp-nocache"):
            skipped[name] = "xllamacpp is not installed (pip install -e '.[bench]')"
    return out, skipped


@contextlib.contextmanager
def serving(name: str, spec: ServerSpec, log: Path) -> Iterator[str]:
    """Run ``spec`` in its own process group on a free loopback port until its probe answers
    200 (bounded by STARTUP_TIMEOUT_S); yields its base URL. On exit, even a failed one, the
    whole group gets SIGTERM, then SIGKILL after STOP_WAIT_S."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [c.replace("{port}", str(port)) for c in spec.command]
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**os.environ, **OFFLINE, **spec.env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited {process.returncode}:\n{tail(log)}")
            try:
                if httpx.get(url + spec.probe, timeout=2, headers=AUTH).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not ready in {STARTUP_TIMEOUT_S} s:\n{tail(log)}")
            time.sleep(0.2)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=STOP_WAIT_S)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # leftovers of the group, if any
        process.wait()


def tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def medserve_prefix_metrics(url: str) -> dict[str, float]:
    """medserve's prefix-cache samples from /metrics (names containing "prefix"); empty when
    it has none or /metrics does not answer."""
    try:
        r = httpx.get(url + "/metrics", timeout=10, headers=AUTH)
    except httpx.TransportError:
        return {}
    found: dict[str, float] = {}
    for line in r.text.splitlines() if r.status_code == 200 else []:
        if line.startswith("medserve_") and "prefix" in line.split(" ")[0]:
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                found[name] = float(value)
    return found


# --- the run ---


def median_of(
    reports: list[bench.Report], pick: Callable[[bench.Report], float | None]
) -> float | None:
    """The median over rounds of ``pick``; None when no round has a value."""
    values = [v for v in map(pick, reports) if v is not None]
    return statistics.median(values) if values else None


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def summary(reports: list[bench.Report]) -> dict[str, Any]:
    """Medians over rounds (seconds, requests/s) and every round's own numbers."""
    return {
        "requests": sum(r.requests for r in reports),
        "completed": sum(r.completed for r in reports),
        "errors": dict(sum((Counter(r.errors) for r in reports), Counter())),
        "req_s": median_of(reports, lambda r: r.requests_per_s),
        "ttft_p50_s": median_of(reports, lambda r: r.ttft_s.get("p50")),
        "ttft_p90_s": median_of(reports, lambda r: r.ttft_s.get("p90")),
        "itl_p50_s": median_of(reports, lambda r: r.itl_s.get("p50")),
        "output_tokens": sum(r.output_tokens for r in reports),
        "rounds": [
            {
                "req_s": r.requests_per_s,
                "ttft_p50_s": r.ttft_s.get("p50"),
                "itl_p50_s": r.itl_s.get("p50"),
                "completed": r.completed,
                "requests": r.requests,
            }
            for r in reports
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parallel", type=int, default=8, help="slots of every server")
    parser.add_argument("--ctx", type=int, default=2048, help="context per slot (tokens)")
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument(
        "--preamble-tokens",
        type=int,
        default=1200,
        help="shared preamble length; at least the rules + guideline (about 850 tokens)",
    )
    parser.add_argument("--users", default="1,8", help="concurrent users, comma-separated")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="rounds; medians are reported (odd: one round's value)",
    )
    parser.add_argument("--seq", type=int, default=3, help="requests per round at 1 user")
    parser.add_argument("--per-user", type=int, default=1, help="requests per user per round")
    parser.add_argument("--off-users", default="1", help="users for the cache-off rows")
    parser.add_argument("--off-seq", type=int, default=1, help="cache-off rows: --seq")
    parser.add_argument("--servers", default="", help="comma-separated names (default: all)")
    parser.add_argument("--request-timeout", type=float, default=300.0, help="seconds")
    parser.add_argument("--time-limit", type=float, default=600.0, help="per run, seconds")
    args = parser.parse_args()
    levels = [int(x) for x in args.users.split(",")]
    off_levels = [int(x) for x in args.off_users.split(",")]
    # A SIGTERM unwinds like Ctrl-C, through the finally blocks that stop the servers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    from llama_cpp import Llama

    vocab = Llama(model_path=str(smollm2_path()), vocab_only=True, verbose=False)

    def count(text: str) -> int:
        return len(vocab.tokenize(text.encode(), add_bos=False, special=False))

    system = preamble(count, args.preamble_tokens)
    preamble_tokens = count(system)
    # Question k of a run: 0 is the warm-up; each (round, level) has its own block.
    block = max(args.seq, args.off_seq, args.per_user * max(levels + off_levels))
    asked = [question(k) for k in range(1 + args.rounds * len(levels) * block)]
    q_tokens = [count(q) for q in asked]
    runs: dict[str, dict[int, list[bench.Report]]] = {}
    cold: dict[str, float | None] = {}
    metrics: dict[str, dict[str, float]] = {}
    started = time.monotonic()

    def note(text: str) -> None:
        print(f"[{time.monotonic() - started:6.0f}s] {text}", file=sys.stderr, flush=True)

    def load(url: str, spec: ServerSpec, users: int, prompts: list[str]) -> bench.Report:
        return asyncio.run(
            bench.run(
                url,
                MODEL,
                concurrency=users,
                requests=len(prompts),
                max_tokens=args.max_tokens,
                prompts=prompts,
                stream=True,
                extra_body=spec.extra_body,
                system=system,
                api_key=DEV_KEY,
                request_timeout_s=args.request_timeout,
                time_limit_s=args.time_limit,
            )
        )

    with tempfile.TemporaryDirectory() as t, contextlib.ExitStack() as stack:
        tmp = Path(t)
        specs, skipped = servers(args, tmp)
        wanted = set(args.servers.split(",")) if args.servers else set(specs) | set(skipped)
        if unknown := wanted - set(specs) - set(skipped):
            parser.error(f"unknown --servers {sorted(unknown)}; known: {sorted(specs)}")
        specs = {n: s for n, s in specs.items() if n in wanted}
        skipped = {n: why for n, why in skipped.items() if n in wanted}
        urls: dict[str, str] = {}
        for name, spec in specs.items():
            urls[name] = stack.enter_context(serving(name, spec, tmp / f"{name}.log"))
            note(f"{name} ready at {urls[name]}")
        for name, spec in specs.items():
            warm = load(urls[name], spec, 1, [asked[0]])
            if not warm.completed:
                log = tail(tmp / f"{name}.log")
                raise RuntimeError(f"{name}: warm-up failed {warm.errors}:\n{log}")
            cold[name] = warm.ttft_s.get("p50")
            note(f"{name} warm-up: cold TTFT {cold[name] or 0:.2f} s")
        names = list(specs)
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)] if names else []
            for name in order:
                spec = specs[name]
                for li, users in enumerate(levels):
                    if spec.reference and users not in off_levels:
                        continue
                    per_round = args.seq if users == 1 else users * args.per_user
                    if spec.reference:
                        per_round = args.off_seq if users == 1 else users * args.per_user
                    first = 1 + (r * len(levels) + li) * block
                    report = load(urls[name], spec, users, asked[first : first + per_round])
                    runs.setdefault(name, {}).setdefault(users, []).append(report)
                    note(
                        f"round {r + 1} {name} users={users}: {report.completed}/"
                        f"{report.requests} ok, {report.requests_per_s:.2f} req/s, TTFT p50 "
                        f"{report.ttft_s.get('p50', float('nan')):.2f} s"
                    )
        for name in specs:
            if name.startswith("medserve"):
                metrics[name] = medserve_prefix_metrics(urls[name])

    result: dict[str, Any] = {
        "workload": {
            "model": "SmolLM2-135M-Instruct Q4_1 (packaged)",
            "threads": args.threads,
            "slots": args.parallel,
            "ctx_per_slot": args.ctx,
            "preamble_tokens": preamble_tokens,
            "question_tokens": [min(q_tokens), max(q_tokens)],
            "max_tokens": args.max_tokens,
            "rounds": args.rounds,
            "users": levels,
            "warm_up_excluded": True,
            "sampling": {"temperature": 0, **SAMPLING},
            "llamacpp_cache_off": 'per request: "cache_prompt": false',
        },
        "servers": {
            name: {
                "cold_ttft_s": cold.get(name),
                "levels": {str(u): summary(rs) for u, rs in runs.get(name, {}).items()},
            }
            for name in specs
        },
        "skipped": skipped,
        "medserve_prefix_metrics": metrics,
        "ratios": ratios(runs),
        "wall_s": round(time.monotonic() - started, 1),
    }
    print_table(result)
    print("JSON " + json.dumps(result, separators=(",", ":"), allow_nan=False))


def ratios(runs: dict[str, dict[int, list[bench.Report]]]) -> dict[str, float | None]:
    """The issue's targets: medserve / llama.cpp with its cache (TTFT p50 <= 1 at 1 and 8
    users; req/s >= 1.5 at 8 users), for the levels both ran."""
    out: dict[str, float | None] = {}
    ours, theirs = runs.get("medserve", {}), runs.get(REFERENCE, {})
    for users in sorted(set(ours) & set(theirs)):
        a = median_of(ours[users], lambda r: r.ttft_s.get("p50"))
        b = median_of(theirs[users], lambda r: r.ttft_s.get("p50"))
        out[f"ttft_p50_medserve_over_llamacpp_{users}u"] = ratio(a, b)
        a = median_of(ours[users], lambda r: r.requests_per_s)
        b = median_of(theirs[users], lambda r: r.requests_per_s)
        out[f"req_s_medserve_over_llamacpp_{users}u"] = ratio(a, b)
    return out


def secs(value: float | None, ms: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.1f}ms" if ms else f"{value:.2f}s"


def print_table(result: dict[str, Any]) -> None:
    w = result["workload"]
    print(
        f"Shared prefix: {w['model']}, preamble {w['preamble_tokens']} tokens + a distinct "
        f"question of {w['question_tokens'][0]}-{w['question_tokens'][1]} tokens, "
        f"{w['max_tokens']} tokens out, greedy, streaming; threads={w['threads']}, "
        f"slots={w['slots']}, ctx/slot={w['ctx_per_slot']}; medians of {w['rounds']} "
        "round(s); the warm-up request (the first to compute the preamble) is excluded"
    )
    print(
        f"{'server':<18} {'users':>5} {'ok':>7} {'req/s':>7} {'TTFT p50':>9} "
        f"{'TTFT p90':>9} {'ITL p50':>8} {'cold TTFT':>10}"
    )
    for name, server in result["servers"].items():
        cold = server["cold_ttft_s"]
        for users, s in server["levels"].items():
            ok = f"{s['completed']}/{s['requests']}"
            print(
                f"{name:<18} {users:>5} {ok:>7} {s['req_s']:>7.3f} {secs(s['ttft_p50_s']):>9} "
                f"{secs(s['ttft_p90_s']):>9} {secs(s['itl_p50_s'], ms=True):>8} "
                f"{secs(cold):>10}"
            )
    for name, why in result["skipped"].items():
        print(f"{name:<18} skipped: {why}")
    for key, target in (
        ("ttft_p50_medserve_over_llamacpp_1u", "<= 1"),
        ("ttft_p50_medserve_over_llamacpp_8u", "<= 1"),
        ("req_s_medserve_over_llamacpp_8u", ">= 1.5"),
    ):
        value = result["ratios"].get(key, "absent")
        if value is None:
            print(f"{key}: no value (a run without a TTFT or with 0 req/s)")
        elif value != "absent":
            met = value <= 1 if target == "<= 1" else value >= 1.5
            print(f"{key}: {value:.3f} (target {target}: {'met' if met else 'NOT met'})")
    for name, samples in result["medserve_prefix_metrics"].items():
        shown = ", ".join(f"{k} {v:g}" for k, v in samples.items()) or "none exported"
        print(f"{name} prefix-cache metrics: {shown}")


if __name__ == "__main__":
    main()
