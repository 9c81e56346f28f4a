#!/usr/bin/env bash
# Make `prometheus` and `promtool` available for the metrics tests (Debian's package).
#
# The tests check the real /metrics page with promtool, check the alert rules, and run a
# real Prometheus on loopback that scrapes a running medserve. They skip, saying why, when
# these binaries are missing and cannot be installed here (no apt, not root). Installing
# never starts the packaged service (scripts/apt-install.sh).
set -euo pipefail

if command -v promtool >/dev/null && command -v prometheus >/dev/null; then
  exit 0
fi
"$(dirname "$0")/apt-install.sh" "for promtool and the scrape test" prometheus \
  || echo "prometheus is not installed: its tests will skip" >&2
