#!/usr/bin/env bash
# Create .venv-litellm: LiteLLM's proxy in a throwaway venv, the peer of the gateway
# benchmark (`make bench-gateway`, tests/bench/gateway.py). Never touches the project's .venv
# and is never needed to serve: medserve does not import LiteLLM, the benchmark only starts
# `litellm` as a separate process on 127.0.0.1 and talks HTTP to it.
#
# Usage: scripts/setup-litellm-venv.sh     (PYTHON=..., MEDSERVE_LITELLM_VENV=... to override)
#
# Exit status (the benchmark skips the LiteLLM column with the last stderr line as reason):
#   0  ready          10  no usable Python / cannot create the venv
#   11  pip could not install litellm (no network, hash mismatch, resolver conflict)
#   12  a .pth start-up hook from litellm was found (the 1.82.7/1.82.8 attack's mark)
#   13  the proxy does not import after install
#   14  the venv path holds something this script did not create
set -uo pipefail

# Pinned exactly, with the hashes PyPI lists for this release, so that a re-published or
# substituted file fails the install: 1.82.7 and 1.82.8 were malicious (a credential stealer
# started from a .pth file, litellm#24518) and a 1.107.0 is reported compromised too. Never
# those. 1.108.7 (uploaded 2026-11-12, not yanked) is the newest release whose `proxy` extra
# resolves from the index here (2026-11-30): 1.110.x requires a `litellm-proxy`
# distribution that is not served, and 1.108.8 ... 1.109.3 pin litellm-proxy-extras /
# litellm-enterprise post-releases that are not served either. Bump deliberately: check the
# release, replace the hashes (https://pypi.org/pypi/litellm/json, "releases"), and the
# stamp below makes every venv reinstall. Its dependencies come from LiteLLM's own metadata
# for the extra (most bounded or pinned there); only litellm itself is hash-checked.
LITELLM_VERSION="1.108.7"
LITELLM_HASHES=(
  # manylinux_2_28 x86_64, manylinux_2_28 aarch64, sdist
  0c8a062e285b793b110a44bae485a2beb83c21381a9e4c62001547f296b0e5af
  a277aff1f051370b5990c4f1d2fa5710b996e8d8a3f53fa056f69bcd61270808
  3646463c77ca780a29df9dfa4959ed04a7710063b25c4b87ebf749c109addeb1
)

root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${MEDSERVE_LITELLM_VENV:-$root/.venv-litellm}"
python="${PYTHON:-python3}"
stamp="$venv/.installed-litellm"
marker="$venv/.medserve-litellm-venv"
want="litellm[proxy]==$LITELLM_VERSION; v1; $("$python" -c 'import sys; print(sys.version.split()[0])' 2>/dev/null)"
# What keeps the smoke import (and the benchmark) off the network: no telemetry, the model
# cost map from the package instead of GitHub.
offline=(LITELLM_TELEMETRY=False LITELLM_LOCAL_MODEL_COST_MAP=True LITELLM_OFFLINE_MODE=true
  DO_NOT_TRACK=1 HF_HUB_OFFLINE=1)

fail() {  # fail CODE REASON: one line the caller can show as the skip reason
  echo "setup-litellm-venv: $2" >&2
  exit "$1"
}

case "$LITELLM_VERSION" in
  1.82.7 | 1.82.8 | 1.107.0) fail 11 "litellm $LITELLM_VERSION is a compromised release" ;;
esac

"$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null \
  || fail 10 "no Python >= 3.11 at '$python' (set PYTHON=...)"

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/litellm" ]; then
  echo "==> $venv is ready (litellm $LITELLM_VERSION)"
  exit 0
fi

if [ -e "$venv" ]; then
  [ -f "$marker" ] || fail 14 "$venv exists but was not made by this script; remove it or set MEDSERVE_LITELLM_VENV"
  echo "==> $venv is stale or incomplete: recreating it"
  rm -rf "$venv"
fi

started=$(date +%s)
echo "==> creating $venv with $python"
"$python" -m venv "$venv" || fail 10 "'$python -m venv $venv' failed"
touch "$marker"
pip=("$venv/bin/python" -m pip --disable-pip-version-check)
log="$venv/install.log"

echo "==> installing litellm $LITELLM_VERSION (hash-checked), then its proxy extra (1-3 min)"
req="$venv/litellm-hashes.txt"
{
  printf 'litellm==%s' "$LITELLM_VERSION"
  for h in "${LITELLM_HASHES[@]}"; do printf ' --hash=sha256:%s' "$h"; done
  printf '\n'
} >"$req"
if ! "${pip[@]}" install --no-deps --require-hashes -r "$req" >"$log" 2>&1 \
  || ! "${pip[@]}" install "litellm[proxy]==$LITELLM_VERSION" >>"$log" 2>&1; then
  tail -n 20 "$log" >&2
  reason="$(grep -m1 -E '^ERROR' "$log" | cut -c1-200)"
  fail 11 "pip install litellm[proxy]==$LITELLM_VERSION failed: ${reason:-see $log}"
fi

# The 1.82.7/1.82.8 payload ran from a .pth file at every interpreter start. Nothing in this
# venv has a reason to ship one named after litellm.
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
hooks="$(find "$site" -maxdepth 1 -name '*.pth' -printf '%f\n' | grep -i litellm)"
[ -z "$hooks" ] || fail 12 "unexpected start-up hook(s) in $site: $hooks"

echo "==> smoke import"
if ! out="$(env "${offline[@]}" "$venv/bin/python" -c '
import litellm, litellm.proxy.proxy_server
from importlib.metadata import version
print("litellm", version("litellm"))
' 2>&1)"; then
  echo "$out" | tail -n 20 >&2
  fail 13 "litellm's proxy does not import after install: $(echo "$out" | tail -n 1 | cut -c1-200)"
fi
echo "    $(echo "$out" | tail -n 1)"
echo "$want" >"$stamp"
echo "==> $venv ready in $(($(date +%s) - started)) s"
