"""``medserve quantize``: a fine-tuned HF checkpoint (plus a LoRA adapter) to GGUF or GPTQ.

Stages, each its own module:

- :mod:`.source`   read the checkpoint (local directory only), merge a LoRA adapter (peft)
- :mod:`.prequant` sources already quantized, or claiming to be: clean, dequantize or refuse
- :mod:`.gguf`     llama.cpp's own converter (F16/BF16), then llama.cpp's quantizer
- :mod:`.gptq`     llm-compressor's GPTQ, written as compressed-tensors (what vLLM loads)
- :mod:`.evaluate` perplexity of original vs quantized on identical token ids; MCQ accuracy
- :mod:`.manifest` hashes, versions, options and the report, checked again at load time
- :mod:`.pipeline` runs the stages in a temporary directory and renames it into place

The heavy libraries (torch, transformers, peft, llm-compressor, gguf) are the ``quant``
extra and are imported only inside the stage that needs them; importing this package, or
:mod:`.manifest` (which the server uses), costs nothing.
"""

from __future__ import annotations

import importlib.util

EXTRA_HINT = (
    "install the quantization extra: scripts/setup-venv.sh quant "
    "(or pip install 'medserve[quant]' with torch==2.13.0 for CPU)"
)

# The modules `medserve quantize` needs, by the distribution that provides them.
NEEDS: dict[str, tuple[str, ...]] = {
    "gguf": ("torch", "transformers", "safetensors", "sentencepiece", "gguf", "llama_cpp"),
    "gptq": ("torch", "transformers", "safetensors", "llmcompressor", "compressed_tensors"),
}


class QuantizeError(Exception):
    """The quantization cannot go on; the message says what to fix. Never holds text data."""


def require(kind: str, lora: bool = False) -> None:
    """Raise QuantizeError naming the extra when a module ``kind`` needs is not installed."""
    modules = NEEDS[kind] + (("peft",) if lora else ())
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise QuantizeError(f"missing {', '.join(missing)}: {EXTRA_HINT}")
