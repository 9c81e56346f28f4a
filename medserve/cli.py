"""The ``medserve`` command: serve models, list the registry."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from medserve import __version__
from medserve.config import ConfigError, load_settings, served_models
from medserve.privacy import apply_offline_env

app = typer.Typer(
    name="medserve",
    help="On-premise, privacy-preserving inference server for medical LLMs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="The model registry.", no_args_is_help=True)
app.add_typer(models_app, name="models")
err = Console(stderr=True)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML settings file.", exists=False)
]
ModelOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--model",
        "-m",
        help="Serve this GGUF instead of the registry: PATH.gguf or ID=PATH.gguf (repeatable).",
    ),
]


def _fail(message: str) -> typer.Exit:
    err.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(2)


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
) -> None:
    """Serve the models over an OpenAI-compatible HTTP API."""
    import uvicorn

    from medserve import logs
    from medserve.api.app import create_app
    from medserve.router import Router

    apply_offline_env(os.environ)
    try:
        settings = load_settings(
            config, host=host, port=port, models_dir=models_dir, log_level=log_level
        )
        router = Router.from_specs(served_models(settings, model))
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    logs.configure(settings.log_level)
    uvicorn.run(
        create_app(settings, router),
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,  # medserve logs its own access line, without paths' values
        server_header=False,
        timeout_graceful_shutdown=30,
    )


@models_app.command("list")
def list_models(config: ConfigOpt = None, model: ModelOpt = None) -> None:
    """Show the models `medserve serve` would load, and whether their files are present."""
    try:
        specs = served_models(load_settings(config), model)
    except ConfigError as exc:
        raise _fail(str(exc)) from None
    table = Table("id", "engine", "context", "weights")
    for spec in specs:
        try:
            where = str(spec.weights()) if spec.engine != "fake" else "(none)"
        except ConfigError as exc:
            where = f"[red]{exc}[/]"
        table.add_row(spec.id, spec.engine, str(spec.context_length or "model"), where)
    Console().print(table)


@app.command()
def version() -> None:
    """Print medserve's version."""
    Console().print(__version__)


def main() -> None:
    app()
