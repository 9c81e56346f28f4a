#!/usr/bin/env bash
# The real-vLLM tier (tests/vllm/, marker `vllm`): set up .venv-vllm, then run the tier
# with the project's test interpreter. Run after the default suite, never beside it: vLLM
# pins the CPU cores it runs on.
#
# Usage: scripts/test-vllm.sh TEST_PYTHON [PYTEST ARGS...]
#   TEST_PYTHON: the project venv's python (it has pytest, the openai client, medserve).
#
# If the vLLM install itself fails (no network, no CPU torch wheel, ...), this prints why
# in a SKIPPED banner and exits 0; if it succeeds, a failing test fails the run.
# MEDSERVE_VLLM_TIER=skip skips the tier on purpose (also with a banner).
set -uo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
test_python="${1:?usage: scripts/test-vllm.sh TEST_PYTHON [PYTEST ARGS...]}"
shift
venv="${MEDSERVE_VLLM_VENV:-$root/.venv-vllm}"
started=$(date +%s)

banner() {
  echo "=============================================================================="
  echo "$1"
  echo "=============================================================================="
}

if [ "${MEDSERVE_VLLM_TIER:-}" = skip ]; then
  banner "SKIPPED: the real-vLLM tier (MEDSERVE_VLLM_TIER=skip)"
  exit 0
fi

errors="$(mktemp)"
trap 'rm -f "$errors"' EXIT
MEDSERVE_VLLM_VENV="$venv" "$root/scripts/setup-vllm-venv.sh" 2>"$errors"
code=$?
cat "$errors" >&2
if [ "$code" != 0 ]; then
  reason="$(grep '^setup-vllm-venv: ' "$errors" | tail -n 1)"
  banner "SKIPPED: the real-vLLM tier: installing vLLM failed (exit $code): ${reason#setup-vllm-venv: }"
  exit 0
fi
installed=$(date +%s)

cd "$root"
MEDSERVE_VLLM_PYTHON="$venv/bin/python" MEDSERVE_VLLM_REQUIRED=1 \
  "$test_python" scripts/run_tests.py -m vllm tests/vllm "$@"
code=$?
done_at=$(date +%s)
echo "real-vLLM tier: setup $((installed - started)) s, tests $((done_at - installed)) s, pytest exit $code"
exit "$code"
