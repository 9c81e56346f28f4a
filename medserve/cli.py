"""The ``medserve`` command: serve, quantize, the registry, audit, keys, bench, doctor."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import SecretStr
from rich.console import Console
from rich.table import Table

from medserve import __version__, pgsql
from medserve.audit.cli import app as audit_app
from medserve.auth.cli import app as keys_app
from medserve.config import Settings, load_settings
from medserve.console import ConfigOpt, err, fail, typer_app
from medserve.engines.llamacpp import LlamaCppSpec
from medserve.engines.vllm import VllmSpec, upstream_hosts
from medserve.errors import ConfigError
from medserve.privacy import EgressGuard, apply_offline_env
from medserve.quantize.cli import add as add_model
from medserve.quantize.cli import quantize
from medserve.registry import served_models

app = typer_app(
    name="medserve",
    help="On-premise, privacy-preserving inference server for medical LLMs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
models_app = typer_app(help="The model registry.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(audit_app, name="audit")
app.add_typer(keys_app, name="keys")
app.command()(quantize)
models_app.command("add")(add_model)

ModelOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--model",
        "-m",
        help="Serve this GGUF instead of the registry: PATH.gguf or ID=PATH.gguf (repeatable).",
    ),
]


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address [default: 127.0.0.1].")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port [default: 8000].")] = None,
    config: ConfigOpt = None,
    model: ModelOpt = None,
    models_dir: Annotated[
        Path | None, typer.Option(help="Model registry directory [default: models].")
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning, error.")] = None,
    dev_key: Annotated[
        bool,
        typer.Option(help="Accept a random admin key for this run only, printed at start."),
    ] = False,
    ssl_certfile: Annotated[
        Path | None, typer.Option(help="Serve HTTPS: certificate chain (PEM).")
    ] = None,
    ssl_keyfile: Annotated[
        Path | None, typer.Option(help="Serve HTTPS: private key (PEM).")
    ] = None,
) -> None:
    """Serve the models over an OpenAI-compatible HTTP API."""
    import uvicorn

    from medserve import audit, logs
    from medserve.api.app import create_app
    from medserve.api.routes import begin_drain
    from medserve.router import Router

    apply_offline_env(os.environ)
    try:
        settings = load_settings(
            config,
            host=host,
            port=port,
            models_dir=models_dir,
            log_level=log_level,
            tls_certfile=ssl_certfile,
            tls_keyfile=ssl_keyfile,
        )
        specs = served_models(settings, model)
        router = Router.from_specs(specs)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    logs.configure(settings.log_level)
    store = None
    if settings.audit.enabled:
        # Opened here, not in the app's start-up, so a problem with the log or its keys
        # is reported plainly before anything else starts.
        try:
            store = audit.open_configured(settings.audit, settings.instance)
        except (audit.AuditError, audit.AuditKeyError) as exc:
            raise fail(f"audit log: {exc}") from None
    else:
        err.print("[bold yellow]warning:[/] the audit log is off (audit.enabled = false)")
    if settings.auth.enabled and settings.auth.url is not None:
        check_keys_database(settings.auth.url.get_secret_value())
    # From here on, nothing in this process may reach a non-local address.
    # A configured vLLM replica's host is allowed as if it were in egress_allow: the
    # registry names it as explicitly as that setting would (README, "Serving on GPUs");
    # so is the database host of [audit] url and [auth] url.
    guard = EgressGuard(
        [
            *settings.egress_allow,
            *upstream_hosts(specs),
            *pgsql.host_names(*settings.database_urls()),
        ]
    )
    guard.install()
    if dev_key:
        token = "ms-dev_" + secrets.token_urlsafe(32)
        auth = settings.auth.model_copy(update={"dev_key": SecretStr(token)})
        settings = settings.model_copy(update={"auth": auth})
        err.print(f"dev key for this run (role admin, every model): [bold]{token}[/]")
    elif settings.auth.enabled and settings.auth.dev_key is None:
        err.print("auth is on: requests need a key from `medserve keys create`")
    application = create_app(settings, router, store, guard)
    server_config = uvicorn.Config(
        application,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,  # medserve logs its own access line, without paths' values
        server_header=False,
        **server_options(settings),
        ssl_certfile=str(settings.tls_certfile) if settings.tls_certfile else None,
        ssl_keyfile=str(settings.tls_keyfile) if settings.tls_keyfile else None,
        # In-flight requests get the drain period, plus a little for the streams' own.
        timeout_graceful_shutdown=int(settings.drain_timeout_s) + 5,
    )

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            begin_drain(application)
            super().handle_exit(sig, frame)

    Server(server_config).run()


def check_keys_database(url: str) -> None:
    """Keys in PostgreSQL: reachable, schema usable, keys readable, reported plainly (no
    password) before anything starts; the server's own store loads them again."""
    from medserve.auth.keys import KeyStoreError
    from medserve.auth.pgkeys import PgKeyStore

    store = PgKeyStore(url)
    try:
        store.refresh()
    except KeyStoreError as exc:
        raise fail(str(exc)) from None
    finally:
        store.close()


def server_options(settings: Settings) -> dict[str, Any]:
    """The uvicorn options that bound what one connection may hold (see config.py).

    Proxy headers are off unless ``trusted_proxies`` lists someone: uvicorn would otherwise
    believe ``X-Forwarded-For`` from 127.0.0.1, that is, from any local process.

    The event loop is asyncio's, never uvloop, which uvicorn would pick by itself wherever
    it is installed (``uvicorn[standard]``): uvloop connects and resolves names in libuv,
    past the ``socket.connect`` and ``socket.getaddrinfo`` audit events the egress guard
    (:mod:`medserve.privacy`) refuses at, so under uvloop the guard would see nothing.
    """
    from medserve.api.transport import ConnectionLimits, protocol

    limits = ConnectionLimits(
        header_timeout_s=settings.header_timeout_s,
        body_timeout_s=settings.body_timeout_s,
        max_connections=settings.max_connections,
    )
    return {
        "loop": "asyncio",
        "http": protocol(limits),
        "timeout_keep_alive": settings.keep_alive_timeout_s,
        "proxy_headers": bool(settings.trusted_proxies),
        "forwarded_allow_ips": list(settings.trusted_proxies) or None,
    }


@models_app.command("list")
def list_models(config: ConfigOpt = None, model: ModelOpt = None) -> None:
    """Show the models `medserve serve` would load, and whether their files are present."""
    try:
        specs = served_models(load_settings(config), model)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    table = Table("id", "engine", "context", "weights")
    for spec in specs:
        fallback = [(f"{e.engine} (fallback)", e) for e in spec.engine_specs[len(spec.replicas) :]]
        # One row per replica, then per fallback engine.
        for kind, replica in [*((e.engine, e) for e in spec.replicas), *fallback]:
            where = "(none)"
            if isinstance(replica, LlamaCppSpec):
                try:
                    where = str(replica.weights(spec.id))
                except ConfigError as exc:
                    where = f"[red]{exc}[/]"
            elif isinstance(replica, VllmSpec):
                launch = replica.launch
                where = f"{launch.model} (supervised)" if launch else f"{replica.url} (remote)"
            context = str(replica.context_length or "model")
            table.add_row(spec.id, kind, context, where)
    Console().print(table)


@app.command()
def bench(
    url: Annotated[str, typer.Option(help="Base URL of the server, without /v1.")] = (
        "http://127.0.0.1:8000"
    ),
    model: Annotated[str, typer.Option(help="Model id to request.")] = "smollm2-135m-instruct",
    concurrency: Annotated[int, typer.Option(min=1, max=1024, help="Requests in flight.")] = 1,
    requests: Annotated[int, typer.Option(min=1, max=100_000, help="Requests in all.")] = 16,
    max_tokens: Annotated[int, typer.Option(min=1, help="max_tokens of each request.")] = 64,
    prompt_file: Annotated[
        Path | None, typer.Option(help="Prompts: JSONL with a 'prompt' field, or one per line.")
    ] = None,
    stream: Annotated[bool, typer.Option(help="Stream, to measure TTFT and ITL.")] = False,
    extra_body: Annotated[
        str | None, typer.Option(help="JSON fields added to every request, e.g. '{\"top_k\": 1}'.")
    ] = None,
    api_key: Annotated[str | None, typer.Option(envvar="MEDSERVE_BENCH_API_KEY")] = None,
    timeout: Annotated[float, typer.Option(help="Per-request timeout, seconds.")] = 300.0,
    time_limit: Annotated[float, typer.Option(help="Stop issuing after this, seconds.")] = 1800.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Load-test an OpenAI-compatible endpoint (medserve, llama.cpp, vLLM, ...)."""
    import asyncio
    import json

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from medserve import bench as load

    try:
        prompts = load.load_prompts(prompt_file)
    except (OSError, ValueError, KeyError) as exc:
        raise fail(f"cannot read prompts: {exc}") from None
    try:
        extra = json.loads(extra_body) if extra_body else {}
    except json.JSONDecodeError:
        raise fail("--extra-body is not valid JSON") from None
    if not isinstance(extra, dict):
        raise fail("--extra-body must be a JSON object")
    progress = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=err,
        disable=as_json,
    )
    with progress:
        task = progress.add_task(f"c={concurrency}", total=requests)
        report = asyncio.run(
            load.run(
                url,
                model,
                concurrency=concurrency,
                requests=requests,
                max_tokens=max_tokens,
                prompts=prompts,
                stream=stream,
                extra_body=extra,
                api_key=api_key,
                request_timeout_s=timeout,
                time_limit_s=time_limit,
                on_done=lambda _: progress.advance(task),
            )
        )
    if as_json:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        _print_report(report)
    if report.completed == 0:
        raise typer.Exit(1)


def _print_report(report: Any) -> None:
    table = Table("metric", "value", title=f"{report.url}  model={report.model}")
    table.add_row("requests ok / sent", f"{report.completed} / {report.requests}")
    table.add_row("errors", ", ".join(f"{k}: {v}" for k, v in report.errors.items()) or "none")
    table.add_row("duration", f"{report.duration_s:.2f} s")
    table.add_row("requests/s", f"{report.requests_per_s:.2f}")
    table.add_row("output tokens/s", f"{report.output_tokens_per_s:.1f}")
    for name, values in (
        ("TTFT", report.ttft_s),
        ("inter-token", report.itl_s),
        ("end-to-end", report.latency_s),
    ):
        if values:
            shown = "  ".join(f"{k} {v * 1000:.0f} ms" for k, v in values.items())
            table.add_row(name, shown)
    Console().print(table)


@app.command()
def doctor(
    config: ConfigOpt = None,
    model: ModelOpt = None,
    host: Annotated[str | None, typer.Option(help="Check this bind address instead.")] = None,
    no_hash: Annotated[bool, typer.Option("--no-hash", help="Skip the weights' sha256.")] = False,
    no_probe: Annotated[
        bool, typer.Option("--no-probe", help="Do not ask remote vLLM replicas for /health.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """Print the privacy and safety posture; exit 1 on a dangerous setting."""
    import json

    from medserve.doctor import checks

    try:
        settings = load_settings(config, host=host)
        specs = served_models(settings, model)
    except ConfigError as exc:
        raise fail(str(exc)) from None
    found = list(checks(settings, specs, hash_models=not no_hash, probe=not no_probe))
    if as_json:
        print(json.dumps([c.__dict__ for c in found], indent=2))
    else:
        colour = {"ok": "green", "warn": "yellow", "danger": "bold red"}
        table = Table("check", "", "detail", title="medserve posture")
        for c in found:
            table.add_row(c.name, f"[{colour[c.level]}]{c.level}[/]", c.detail)
        Console().print(table)
    if any(c.level == "danger" for c in found):
        raise typer.Exit(1)


@app.command()
def version() -> None:
    """Print medserve's version."""
    Console().print(__version__)


def main() -> None:
    app()
