#!/usr/bin/env bash
# Make PostgreSQL's server binaries (initdb, pg_ctl, postgres) available for the tests that
# run medserve against a real PostgreSQL (Debian's `postgresql` package).
#
# The tests start a throwaway server of their own (tests/pg.py: initdb + pg_ctl in a temp
# directory, listening on a unix socket there only, as a dedicated unprivileged user); they
# skip, saying why, when the binaries are missing and cannot be installed here (no apt, not
# root). Installing never starts the packaged service (scripts/apt-install.sh), so no
# PostgreSQL listens on port 5432 afterwards.
set -euo pipefail

have_postgres() {
  command -v initdb >/dev/null && command -v pg_ctl >/dev/null && return 0
  # Debian keeps them out of PATH, under /usr/lib/postgresql/<major>/bin.
  compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null
}

if have_postgres; then
  exit 0
fi
"$(dirname "$0")/apt-install.sh" "for the tests on a real PostgreSQL" postgresql \
  || echo "postgresql is not installed: its tests will skip" >&2
