#!/usr/bin/env bash
# Make `prometheus` and `promtool` available for the metrics tests (Debian's package).
#
# The tests check the real /metrics page with promtool, check the alert rules, and run a
# real Prometheus on loopback that scrapes a running medserve. They skip, saying why, when
# these binaries are missing and cannot be installed here (no apt, not root).
# Installing never starts the packaged service: a policy-rc.d that refuses every start is
# in place while apt runs, so no Prometheus listens on 0.0.0.0:9090 afterwards.
set -euo pipefail

if command -v promtool >/dev/null && command -v prometheus >/dev/null; then
  exit 0
fi
if ! command -v apt-get >/dev/null || [ "$(id -u)" != 0 ]; then
  echo "prometheus not installed and cannot install it (needs apt-get as root): its tests will skip" >&2
  exit 0
fi
echo "==> installing prometheus from Debian (for promtool and the scrape test)"
policy=/usr/sbin/policy-rc.d
added=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy"
  chmod +x "$policy"
  added=1
fi
trap '[ "$added" = 1 ] && rm -f "$policy"' EXIT
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q --no-install-recommends prometheus >/dev/null \
  || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends prometheus >/dev/null; } \
  || echo "apt-get could not install prometheus: its tests will skip" >&2
