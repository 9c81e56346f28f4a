#!/usr/bin/env bash
# The systemd units in deploy/systemd, checked offline (no systemd as PID 1 needed):
#   1. `systemd-analyze verify` on a copy whose Exec* programs are swapped for /bin/true
#      (verify insists they exist; /opt/medserve is not installed here). ANY output fails:
#      a misspelled or unknown key is only a warning, and rc stays 0.
#   2. `systemd-analyze security --offline=true --threshold=N`: each unit's exposure must
#      not rise above the threshold below, set just above its score when it was written,
#      so a weakened unit fails. Lower a threshold when a unit gets stricter.
# Template units (NAME@.service) are checked as the instance NAME@check.service, so that
# their %i specifiers resolve.
# Usage: scripts/check-units.sh [DIR]   (default: deploy/systemd)
# systemd-analyze comes from Debian's systemd package (>= 250 for --offline); it is
# installed when missing and this runs as root with apt-get; otherwise the check is
# SKIPPED with the reason, and exits 0.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:-deploy/systemd}"

# Exposure thresholds on systemd-analyze's 0-100 scale (a score of 0.9 is 9).
declare -A threshold=(
    [medserve.service]=10         # scored 0.9 SAFE (was 7.4 MEDIUM before issue 20)
    [medserve-vllm@.service]=14   # scored 1.3 OK
)

skip() {
    echo "SKIPPED: systemd units: $*"
    exit 0
}

if ! command -v systemd-analyze >/dev/null 2>&1; then
    "$(dirname "$0")/apt-install.sh" "for systemd-analyze" systemd \
        || skip "systemd-analyze is missing and could not be installed (reason above)"
fi
version=$(systemd-analyze --version | awk 'NR == 1 {print $2}')
if [ "${version%%.*}" -lt 250 ] 2>/dev/null; then
    skip "systemd $version is older than 250 (no 'security --offline')"
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
failed=0
shopt -s nullglob
units=("$dir"/*.service "$dir"/*.socket "$dir"/*.timer "$dir"/*.path)
[ ${#units[@]} -gt 0 ] || { echo "check-units: no units in $dir"; exit 1; }

for unit in "${units[@]}"; do
    name=$(basename "$unit")
    checked=$name
    case $name in *@.*) checked="${name/@./@check.}" ;; esac
    # Exec*= lines: keep the prefixes (-+!@:), swap the program, keep the arguments.
    sed -E 's#^(Exec[A-Za-z]*=[-+!@:]*)[^ ]+#\1/bin/true#' "$unit" >"$work/$checked"

    out=$(cd "$work" && systemd-analyze verify "./$checked" 2>&1) && rc=0 || rc=$?
    if [ "$rc" -ne 0 ] || [ -n "$out" ]; then
        echo "FAIL $name: systemd-analyze verify (rc $rc):"
        printf '%s\n' "$out" | sed 's/^/    /'
        failed=1
    else
        echo "ok   $name: systemd-analyze verify"
    fi

    limit=${threshold[$name]:-}
    if [ -z "$limit" ]; then
        echo "FAIL $name: no exposure threshold in scripts/check-units.sh; add one"
        failed=1
        continue
    fi
    out=$(cd "$work" && systemd-analyze security --offline=true --threshold="$limit" \
        --no-pager "./$checked" 2>&1) && rc=0 || rc=$?
    score=$(printf '%s\n' "$out" | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\) \([A-Z]*\).*/\1 \2/p')
    if [ -z "$score" ]; then
        echo "FAIL $name: systemd-analyze security printed no score (rc $rc):"
        printf '%s\n' "$out" | tail -n 5 | sed 's/^/    /'
        failed=1
    elif [ "$rc" -ne 0 ]; then
        echo "FAIL $name: exposure $score, above the threshold $limit/100; what is open:"
        printf '%s\n' "$out" | grep '✗' | sed 's/^/    /'
        failed=1
    else
        echo "ok   $name: exposure $score (threshold $limit/100)"
    fi
done

if [ "$failed" -ne 0 ]; then
    echo "check-units: FAILED"
    exit 1
fi
echo "check-units: all passed"
