"""GGUF: llama.cpp's own converter (HF -> F16/BF16), then llama.cpp's own quantizer.

Both come from the pinned llama-cpp-python, so the files they write are the files the
serving engine reads:

- The converter (``convert_hf_to_gguf.py`` with its ``conversion`` and ``gguf-py``
  packages) ships only in llama-cpp-python's source distribution. ``scripts/setup-venv.sh``
  extracts it from the sdist the engine was built from into ``<venv>/share/medserve/
  llama.cpp-<version>/``; nothing of it is kept in this repository. It runs as a
  subprocess, behind :mod:`medserve.quantize.offline` (offline variables, egress guard).
  It knows the LLaMA, Mistral, Qwen2, Gemma and SmolLM tokenizers and rope variants, which
  a converter of our own would have to re-implement.
- The quantizer is ``llama_model_quantize`` through llama-cpp-python's ctypes binding; its
  per-tensor log lines drive the progress bar.

The ``gguf`` library then reads every written file back (tensor count, types, bits per
weight): a cross-check that does not trust either tool's own account.
"""

from __future__ import annotations

import collections
import ctypes
import os
import re
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any

from medserve.privacy import OFFLINE_ENV
from medserve.quantize import QuantizeError
from medserve.quantize.progress import Stage

# --type values -> llama.cpp's llama_ftype names (llama.h).
TYPES: dict[str, str] = {
    "f16": "LLAMA_FTYPE_MOSTLY_F16",
    "bf16": "LLAMA_FTYPE_MOSTLY_BF16",
    "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0",
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
}
BASE_TYPES = ("f16", "bf16")
CONVERTER_ENV = "MEDSERVE_GGUF_CONVERTER"
_TENSOR_LINE = re.compile(rb"^\[\s*\d+/\s*\d+\]")
# "NotImplementedError: ...", "KeyError: 'x'", "llama_model_quantize: failed to ...".
_ERROR_LINE = re.compile(r"^([A-Za-z_][\w.]*(Error|Exception)\b|.*\b(error|failed)\b)", re.I)


def converter(override: Path | None = None) -> Path:
    """The converter script: ``override``, ``$MEDSERVE_GGUF_CONVERTER``, or the venv's copy."""
    from importlib.metadata import version

    if override is None and os.environ.get(CONVERTER_ENV):
        override = Path(os.environ[CONVERTER_ENV])
    if override is not None:
        if not override.is_file():
            raise QuantizeError(f"--converter: no such file: {override}")
        return override
    pinned = version("llama-cpp-python")
    path = Path(sys.prefix) / "share" / "medserve" / f"llama.cpp-{pinned}" / "convert_hf_to_gguf.py"
    if not path.is_file():
        raise QuantizeError(
            f"llama.cpp's converter for llama-cpp-python {pinned} is not installed at {path}: "
            f"run scripts/setup-venv.sh, or set {CONVERTER_ENV}"
        )
    return path


def tensor_count(source: Path) -> int:
    """How many tensors the checkpoint's safetensors files hold (the converter's work)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(source.glob("*.safetensors")):
        with safe_open(str(file), framework="numpy") as f:
            total += len(list(f.keys()))
    return total


def last_error(lines: list[str]) -> str:
    """The line a failure log ends with that says what went wrong (a traceback's last line,
    an ``error:`` line), else its last non-empty line; at most 300 characters."""
    text = [line.strip() for line in lines if line.strip()]
    for line in reversed(text):
        if _ERROR_LINE.match(line):
            return line[:300]
    return text[-1][:300] if text else "no output"


def convert(source: Path, out: Path, outtype: str, script: Path, stage: Stage, log: Path) -> None:
    """HF checkpoint directory -> one GGUF file of ``outtype`` (f16 or bf16).

    The converter's whole output goes to ``log``; on success the log is removed, on
    failure it is kept and the QuantizeError names it with the converter's last error
    line (its traceback never reaches the terminal).
    """
    if outtype not in BASE_TYPES:
        raise QuantizeError(f"--base must be one of {', '.join(BASE_TYPES)}")
    cmd = [
        sys.executable,
        "-m",
        "medserve.quantize.offline",
        str(script),
        str(source),
        "--outfile",
        str(out),
        "--outtype",
        outtype,
    ]
    env = {**os.environ, **OFFLINE_ENV, "PYTHONUNBUFFERED": "1"}
    tail: deque[str] = deque(maxlen=50)
    try:
        with (
            log.open("w", encoding="utf-8") as sink,
            subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                text=True,
                errors="replace",
            ) as proc,
        ):
            assert proc.stdout is not None
            for line in proc.stdout:
                sink.write(line)
                tail.append(line.rstrip())
                # One "name, dtype --> TYPE, shape = ..." line per tensor it prepares.
                if "-->" in line:
                    stage.advance()
            code = proc.wait()
    except BaseException:
        log.unlink(missing_ok=True)
        raise
    if code != 0 or not out.is_file():
        raise QuantizeError(
            f"llama.cpp's converter failed (exit {code}): {last_error(list(tail))}\n"
            f"Its full output is in {log}"
        )
    log.unlink(missing_ok=True)


def quantize(source: Path, out: Path, kind: str, threads: int, stage: Stage, log: Path) -> None:
    """F16/BF16 GGUF -> ``kind`` through ``llama_model_quantize``.

    llama.cpp's log lines are collected; on failure they are written to ``log`` and the
    QuantizeError names it with the last error line.
    """
    import llama_cpp
    from llama_cpp import _logger

    if kind not in TYPES:
        raise QuantizeError(f"--type must be one of {', '.join(TYPES)}")

    lines: deque[bytes] = deque(maxlen=2000)

    @llama_cpp.llama_log_callback  # type: ignore[untyped-decorator]
    def on_log(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        lines.append(text)
        if _TENSOR_LINE.match(text):
            stage.advance()

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, TYPES[kind])
    params.nthread = threads
    llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))
    try:
        code = llama_cpp.llama_model_quantize(
            str(source).encode(), str(out).encode(), ctypes.byref(params)
        )
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    if code != 0 or not out.is_file():
        text = b"".join(lines).decode("utf-8", "replace")
        log.write_text(text, encoding="utf-8")
        raise QuantizeError(
            f"llama.cpp's quantizer failed for {kind} (code {code}): "
            f"{last_error(text.splitlines())}\nIts full log is in {log}"
        )
    log.unlink(missing_ok=True)


def describe(path: Path) -> dict[str, Any]:
    """Read a GGUF back with the ``gguf`` library: tensors, weights, bits per weight, types.

    ``tensor_types`` shows fallbacks: a K-quant file of a model whose widths are not
    multiples of 256 holds many Q5_0/Q8_0 tensors instead.
    """
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    weights = sum(int(t.n_elements) for t in reader.tensors)
    data = sum(int(t.n_bytes) for t in reader.tensors)
    types = collections.Counter(t.tensor_type.name for t in reader.tensors)
    arch_field = reader.fields.get("general.architecture")
    arch = None
    if arch_field is not None:
        arch = bytes(arch_field.parts[arch_field.data[0]]).decode("utf-8", "replace")
    return {
        "architecture": arch,
        "tensors": len(reader.tensors),
        "weights": weights,
        "bits_per_weight": round(8 * data / weights, 3) if weights else None,
        "tensor_types": dict(sorted(types.items())),
    }
