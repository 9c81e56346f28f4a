#!/usr/bin/env bash
# Make PostgreSQL's server binaries (initdb, pg_ctl, postgres) available for the tests that
# run medserve against a real PostgreSQL (Debian's `postgresql` package).
#
# The tests start a throwaway server of their own (tests/pg.py: initdb + pg_ctl in a temp
# directory, listening on a unix socket there only, as a dedicated unprivileged user); they
# skip, saying why, when the binaries are missing and cannot be installed here (no apt, not
# root). Installing never starts the packaged service: a policy-rc.d that refuses every
# start is in place while apt runs, so no PostgreSQL listens on port 5432 afterwards.
set -euo pipefail

have_postgres() {
  command -v initdb >/dev/null && command -v pg_ctl >/dev/null && return 0
  # Debian keeps them out of PATH, under /usr/lib/postgresql/<major>/bin.
  compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null
}

if have_postgres; then
  exit 0
fi
if ! command -v apt-get >/dev/null || [ "$(id -u)" != 0 ]; then
  echo "postgresql not installed and cannot install it (needs apt-get as root): its tests will skip" >&2
  exit 0
fi
echo "==> installing postgresql from Debian (for the tests on a real PostgreSQL)"
policy=/usr/sbin/policy-rc.d
added=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy"
  chmod +x "$policy"
  added=1
fi
trap '[ "$added" = 1 ] && rm -f "$policy"' EXIT
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -q --no-install-recommends postgresql >/dev/null \
  || { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends postgresql >/dev/null; } \
  || echo "apt-get could not install postgresql: its tests will skip" >&2
