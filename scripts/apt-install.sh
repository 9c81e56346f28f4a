#!/usr/bin/env bash
# Install Debian packages that the tests and checks need, never starting their services.
#
# Usage: scripts/apt-install.sh WHY PACKAGE...
#        APT_WITH_RECOMMENDS=1 scripts/apt-install.sh ...   (podman needs its recommends:
#        netavark, aardvark-dns, slirp4netns, catatonit)
# Exits 0 once the packages are installed, 1 with the reason on stderr when that cannot be
# done here (no apt-get, not root, apt failed); the caller says what skips then.
# A policy-rc.d that refuses every start is in place while apt runs, so no packaged
# service (Prometheus on 0.0.0.0:9090, PostgreSQL on 5432, ...) is left listening.
set -euo pipefail

why="$1"
shift
if ! command -v apt-get >/dev/null || [ "$(id -u)" != 0 ]; then
  echo "cannot install $* (needs apt-get as root)" >&2
  exit 1
fi
echo "==> installing $* from Debian ($why)"
policy=/usr/sbin/policy-rc.d
added=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy"
  chmod +x "$policy"
  added=1
fi
trap '[ "$added" = 1 ] && rm -f "$policy"' EXIT
export DEBIAN_FRONTEND=noninteractive
flags=(-y -q)
[ "${APT_WITH_RECOMMENDS:-0}" = 1 ] || flags+=(--no-install-recommends)
if apt-get install "${flags[@]}" "$@" >/dev/null \
  || { apt-get update -q >/dev/null && apt-get install "${flags[@]}" "$@" >/dev/null; }; then
  exit 0
fi
echo "apt-get could not install $*" >&2
exit 1
