"""One quantization run: checks, merge, original baseline, quantize, evaluate, manifest.

Everything is written into a hidden sibling of ``--out`` (``.NAME.partial-XXXX``) and
renamed into place only when every file and the manifest are complete; an error or Ctrl-C
removes it. So a directory named like an artifact is always a whole, evaluated artifact.

Checks that need no heavy work (paths, types, group size, texts, and whether the source
is already quantized: :mod:`.prequant`) run before anything long, so a typo costs seconds,
not a calibration run.

When a tool run by the pipeline fails (llama.cpp's converter, its quantizer, GPTQ), the
error names the tool and its last error line; its full log is kept beside ``--out`` as
``<out>.<tool>.log`` (see :func:`tool_log`), since the work directory is removed.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal

from medserve import manifest as mf
from medserve.quantize import QuantizeError, prequant, require
from medserve.quantize import evaluate as ev
from medserve.quantize.progress import Reporter
from medserve.quantize.source import (
    check_adapter,
    check_checkpoint,
    dtype_of,
    fingerprint,
    merge_lora,
)

DTYPES = ("auto", "float32", "bfloat16", "float16")
TOOLS = (
    "medserve",
    "llama-cpp-python",
    "torch",
    "transformers",
    "safetensors",
    "tokenizers",
    "sentencepiece",
    "peft",
    "gguf",
    "llmcompressor",
    "compressed-tensors",
)


@dataclass(frozen=True)
class Options:
    """Everything a run depends on; recorded in the manifest as given."""

    source: Path
    to: Literal["gguf", "gptq"]
    out: Path
    lora: Path | None = None
    types: tuple[str, ...] = ("q4_k_m",)
    base: str = "f16"
    bits: int = 4
    group_size: int = 128
    calibration: Path | None = None
    samples: int = 64
    seq_len: int = 512
    eval_text: Path | None = None
    eval_chunk: int = 128
    eval_tokens: int = 8192
    eval_mcq: Path | None = None
    dtype: str = "auto"
    threads: int | None = None
    converter: Path | None = None
    name: str | None = None
    force: bool = False

    def recorded(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


def project_file(name: str) -> Path:
    """A file of the project's ``quant/`` texts (in the wheel: ``medserve/_quant``)."""
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "_quant" / name, package.parent / "quant" / name):
        if candidate.is_file():
            return candidate
    raise QuantizeError(f"the project's quant/{name} is missing from this installation")


def run(opts: Options, reporter: Reporter) -> dict[str, Any]:
    """Quantize, evaluate, write the artifact directory; return its manifest."""
    from medserve.quantize import gguf, gptq

    require(opts.to, lora=opts.lora is not None)
    config = check_checkpoint(opts.source)
    plan = prequant.inspect(opts.source, config)
    if opts.lora is not None:
        check_adapter(opts.lora)
    script = None
    if opts.to == "gguf":
        unknown = [t for t in opts.types if t not in gguf.TYPES]
        if unknown or not opts.types:
            raise QuantizeError(f"--type must be among {', '.join(gguf.TYPES)}")
        script = gguf.converter(opts.converter)
    else:
        gptq.load_calibration(opts.calibration or project_file("calibration.jsonl"))
        if opts.bits not in gptq.BITS:
            raise QuantizeError("--bits must be 4 or 8")
    if opts.eval_mcq is not None:
        ev.load_mcq(opts.eval_mcq)
    if opts.dtype not in DTYPES:
        raise QuantizeError(f"--dtype must be one of {', '.join(DTYPES)}")
    out = opts.out.resolve()
    if out.exists() and not opts.force:
        raise QuantizeError(f"--out {out} exists: choose a new directory, or --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        manifest = _build(opts, config, plan, script, partial, reporter)
        mf.write(partial, manifest)
        _replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return mf.load(out)


def tool_log(out: Path, tool: str) -> Path:
    """Where a failed tool's full log is kept: ``<out>.<tool>.log`` beside ``--out``.

    Removed again when the tool succeeds, so a log beside an artifact is always the log
    of the last failure.
    """
    out = out.resolve()
    return out.with_name(f"{out.name}.{tool}.log")


def _replace(partial: Path, out: Path) -> None:
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
        os.rename(partial, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(partial, out)


def _prepare(
    opts: Options, config: dict[str, Any], plan: prequant.Plan, work: Path, reporter: Reporter
) -> Path:
    """The directory every later stage reads: the source, or a cleaned/dequantized copy."""
    if plan.action == "clean":
        assert plan.config_key is not None
        with reporter.stage(
            f"ignore stale quantization_config ({plan.claimed}): weights are {plan.found}"
        ):
            return prequant.clean_view(opts.source, config, plan.config_key, work / "source")
    if plan.action == "dequantize-fp8":
        with reporter.stage("dequantize FP8 weights"):
            return prequant.dequantize_fp8(opts.source, config, plan, work / "dequantized")
    if plan.action == "dequantize-compressed":
        with reporter.stage("dequantize compressed-tensors weights"):
            return prequant.dequantize_compressed(opts.source, config, plan, work / "dequantized")
    return opts.source


def _build(
    opts: Options,
    config: dict[str, Any],
    plan: prequant.Plan,
    script: Path | None,
    partial: Path,
    reporter: Reporter,
) -> dict[str, Any]:
    """Everything between the checks and the manifest: returns the manifest's content."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    began = time.perf_counter()
    work = partial / ".work"
    work.mkdir()
    with reporter.stage("hash inputs"):
        source = fingerprint(opts.source)
        adapter = fingerprint(opts.lora) if opts.lora is not None else None
    # The checkpoint's identity, for people and other tools: which artifacts were made
    # from the same model (GGUF and GPTQ of one fine-tune). The server recomputes it from
    # the file tables (manifest.source_identity) before it allows GPU -> CPU fallback.
    source["identity"] = mf.identity_of(source, adapter)
    if plan.action != "none":
        source["quantization"] = plan.recorded()
    model_dir = _prepare(opts, config, plan, work, reporter)
    if opts.lora is not None:
        with reporter.stage("merge LoRA"):
            merge_lora(model_dir, opts.lora, work / "merged")
        model_dir = work / "merged"

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    text_path = opts.eval_text or project_file("eval.txt")
    text = ev.prepare_text(text_path, tokenizer, opts.eval_chunk, opts.eval_tokens)
    questions = ev.load_mcq(opts.eval_mcq) if opts.eval_mcq is not None else []

    def encode(s: str) -> list[int]:
        return [int(i) for i in tokenizer(s, add_special_tokens=True)["input_ids"]]

    dtype_name = dtype_of(config) if opts.dtype == "auto" else opts.dtype
    dtype = getattr(torch, dtype_name, torch.float32)
    with reporter.stage("load original"):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, local_files_only=True)
        # Evaluation on the GPU when there is one; GPTQ moves layers there by itself.
        _move(model, _device())
    parameters = sum(p.numel() for p in model.parameters())
    widths: dict[str, int] = {}
    if opts.to == "gptq":
        from medserve.quantize import gptq

        widths = gptq.target_widths(model)
        gptq.check_group_size(widths, opts.group_size)

    steps = len(text.chunks()) + len(questions)
    with reporter.stage("evaluate original", total=steps) as stage:
        scorer = ev.HFScorer(model)
        original = ev.perplexity(scorer, text, stage)
        original_answers = ev.mcq_answers(scorer, encode, questions, stage)
    baseline = {"dtype": dtype_name, **original}
    if questions:
        right = sum(a == q.answer for a, q in zip(original_answers, questions, strict=True))
        baseline["mcq_accuracy"] = round(right / len(questions), 4)

    def compare(result: dict[str, Any], answers: list[str]) -> dict[str, Any]:
        change = 100 * (result["perplexity"] / original["perplexity"] - 1)
        found = {**result, "perplexity_change_pct": round(change, 3)}
        if questions:
            found["mcq"] = ev.mcq_report(questions, original_answers, answers)
        return found

    evaluation = _Eval(text, questions, encode, compare, opts.threads or os.cpu_count() or 1)
    name = opts.name or opts.source.resolve().name
    tools_extra: dict[str, Any] = {}
    if script is not None:
        del model, scorer
        gc.collect()
        artifacts = _gguf(opts, script, model_dir, name, partial, work, evaluation, reporter)
        tools_extra["converter"] = {"path": str(script), "sha256": mf.sha256_file(script)}
    else:
        del scorer
        _move(model, "cpu")
        artifact = _gptq_write(opts, model, widths, tokenizer, model_dir, partial, reporter)
        del model  # the last reference: the quantized copy is loaded back from disk
        gc.collect()
        artifacts = [_gptq_evaluate(artifact, partial, evaluation, reporter)]
    shutil.rmtree(work)
    return {
        "kind": opts.to,
        "name": name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "source": source,
        "adapter": adapter,
        "model": {
            "architectures": config.get("architectures"),
            "model_type": config.get("model_type"),
            "context_length": config.get("max_position_embeddings"),
            "parameters": parameters,
            "dtype": dtype_of(config),
        },
        "tools": {**_versions(), **tools_extra},
        "options": opts.recorded(),
        "report": {
            "eval_text": text.describe(),
            "eval_mcq": (
                {"file": opts.eval_mcq.name, "sha256": mf.sha256_file(opts.eval_mcq)}
                if opts.eval_mcq is not None
                else None
            ),
            "original": baseline,
            "artifacts": artifacts,
            "stage_seconds": {k: round(v, 2) for k, v in reporter.seconds.items()},
            "seconds": round(time.perf_counter() - began, 2),
        },
    }


@dataclass(frozen=True)
class _Eval:
    """What every artifact is scored on, and how its result is set against the original."""

    text: ev.EvalText
    questions: list[ev.Question]
    encode: Callable[[str], list[int]]
    compare: Callable[[dict[str, Any], list[str]], dict[str, Any]]
    threads: int

    @property
    def steps(self) -> int:
        return len(self.text.chunks()) + len(self.questions)


def _gguf(
    opts: Options,
    script: Path,
    model_dir: Path,
    name: str,
    partial: Path,
    work: Path,
    evaluation: _Eval,
    reporter: Reporter,
) -> list[dict[str, Any]]:
    from medserve.quantize import gguf

    keep_base = opts.base in opts.types
    base_path = (partial if keep_base else work) / f"{name}-{opts.base}.gguf"
    with reporter.stage(f"convert to {opts.base}", total=gguf.tensor_count(model_dir)) as stage:
        t0 = time.perf_counter()
        log = tool_log(opts.out, "convert")
        gguf.convert(model_dir, base_path, opts.base, script, stage, log)
        convert_s = time.perf_counter() - t0
    n_ctx = evaluation.text.chunk
    if evaluation.questions:
        n_ctx = max(n_ctx, ev.longest(evaluation.questions, evaluation.encode))
    artifacts = []
    ordered = sorted(set(opts.types), key=list(gguf.TYPES).index)
    for kind in ordered:
        if kind == opts.base:
            path, seconds = base_path, convert_s
        else:
            path = partial / f"{name}-{kind}.gguf"
            total = gguf.describe(base_path)["tensors"]
            with reporter.stage(f"quantize {kind}", total=total) as stage:
                t0 = time.perf_counter()
                log = tool_log(opts.out, f"quantize-{kind}")
                gguf.quantize(base_path, path, kind, evaluation.threads, stage, log)
                seconds = convert_s + time.perf_counter() - t0
        info = gguf.describe(path)
        with reporter.stage(f"evaluate {kind}", total=evaluation.steps) as stage:
            text = evaluation.text
            ev.check_tokenizer(text, ev.llama_tokenize(path, text.text, add_bos=text.bos))
            scorer = ev.LlamaScorer(path, n_ctx, evaluation.threads)
            try:
                result = ev.perplexity(scorer, evaluation.text, stage)
                answers = ev.mcq_answers(scorer, evaluation.encode, evaluation.questions, stage)
            finally:
                scorer.close()
        artifacts.append(
            {
                "file": path.name,
                "format": "gguf",
                "type": kind,
                "bytes": path.stat().st_size,
                **info,
                "seconds": round(seconds, 2),
                "tokenizer_match": True,
                **evaluation.compare(result, answers),
            }
        )
    return artifacts


def _gptq_write(
    opts: Options,
    model: Any,
    widths: dict[str, int],
    tokenizer: Any,
    model_dir: Path,
    partial: Path,
    reporter: Reporter,
) -> dict[str, Any]:
    """Calibrate and quantize ``model`` in place, save it compressed; the artifact's facts."""
    from medserve.quantize import gptq

    texts = gptq.load_calibration(opts.calibration or project_file("calibration.jsonl"))
    sequences = gptq.calibration_ids(texts, tokenizer, opts.samples, opts.seq_len)
    parameters = sum(p.numel() for p in model.parameters())
    with reporter.stage("calibrate GPTQ", total=len(widths)) as stage:
        t0 = time.perf_counter()
        log = tool_log(opts.out, "gptq")
        gptq.quantize(model, sequences, opts.bits, opts.group_size, opts.seq_len, stage, log)
        seconds = time.perf_counter() - t0
    with reporter.stage("write"):
        model.save_pretrained(partial, save_compressed=True)
        for file in mf.TOKENIZER_FILES:
            if (model_dir / file).is_file():
                shutil.copy2(model_dir / file, partial / file)
    weights = sorted(partial.glob("*.safetensors"))
    size = sum(f.stat().st_size for f in weights)
    # What vLLM will read to pick its kernels.
    written = json.loads((partial / "config.json").read_text(encoding="utf-8"))
    return {
        "file": [f.name for f in weights],
        "format": "gptq",
        "type": f"w{opts.bits}a16-"
        + ("channel" if opts.group_size == -1 else f"g{opts.group_size}"),
        "quant_method": written.get("quantization_config", {}).get("quant_method"),
        "bits": opts.bits,
        "group_size": opts.group_size,
        "bytes": size,
        "bits_per_weight": round(8 * size / parameters, 3),
        "samples": len(sequences),
        "seconds": round(seconds, 2),
    }


def _gptq_evaluate(
    artifact: dict[str, Any], partial: Path, evaluation: _Eval, reporter: Reporter
) -> dict[str, Any]:
    """Load the written checkpoint back (as vLLM or transformers would) and score it."""
    from transformers import AutoModelForCausalLM

    with reporter.stage("load back and evaluate", total=evaluation.steps) as stage:
        quantized = AutoModelForCausalLM.from_pretrained(partial, local_files_only=True)
        scorer = ev.HFScorer(_move(quantized, _device()))
        result = ev.perplexity(scorer, evaluation.text, stage)
        answers = ev.mcq_answers(scorer, evaluation.encode, evaluation.questions, stage)
    del quantized, scorer
    gc.collect()
    return {**artifact, **evaluation.compare(result, answers)}


def _move(model: Any, device: str) -> Any:
    return model.to(device)


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {}
    for dist in TOOLS:
        try:
            found[dist] = version(dist)
        except PackageNotFoundError:
            found[dist] = None
    return found
