#!/usr/bin/env bash
# Make podman, buildah, runc and mmdebstrap available, and write the runtime settings this
# project's images are built and run with. Source it (`. scripts/ensure-podman.sh`) to get
# CONTAINERS_CONF exported; run it to install only.
#
# Installs from Debian (bookworm: podman 4.3.1, buildah 1.28.2, runc 1.1.5, mmdebstrap
# 1.3.5) when missing; fast when present. Never edits /etc: the settings go into
# var/containers/containers.conf, named by CONTAINERS_CONF (podman and buildah honour it).
# Why these settings (measured, ../shared/research/containers-offline.md section 1):
# - runtime runc: crun 1.8 refuses hybrid cgroups (v1 controllers + a cgroup2 mount)
#   ("cgroups in hybrid mode not supported"), which is what this VM kind has.
# - default_ulimits: rootful podman asks for RLIMIT_NOFILE 1048576; without
#   CAP_SYS_RESOURCE nothing can raise a hard limit, so the run fails with "setrlimit
#   RLIMIT_NOFILE: Operation not permitted". nofile is capped at this shell's hard limit and
#   nproc at 32768 (conmon's own hard NPROC is pid_max here).
# Exit status: 0 when the tools are there (or installed); 3 when they are missing and cannot
# be installed (no apt-get, not root, apt failed): the caller prints SKIPPED and why.
set -euo pipefail

_ep_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_ep_missing=()
for _ep_tool in podman buildah runc mmdebstrap; do
  command -v "$_ep_tool" >/dev/null || _ep_missing+=("$_ep_tool")
done
if [ "${#_ep_missing[@]}" -gt 0 ]; then
  if ! APT_WITH_RECOMMENDS=1 "$_ep_root/scripts/apt-install.sh" "for building and running images; first time ~30 s" \
    podman buildah runc mmdebstrap; then
    echo "ensure-podman: missing ${_ep_missing[*]} and could not install them" >&2
    # shellcheck disable=SC2317  # `return` when sourced, `exit` when run
    return 3 2>/dev/null || exit 3
  fi
fi

_ep_conf_dir="$_ep_root/var/containers"
mkdir -p "$_ep_conf_dir"
_ep_nofile="$(ulimit -Hn)"
[ "$_ep_nofile" = unlimited ] && _ep_nofile=1048576
_ep_nproc=32768
_ep_conf="$_ep_conf_dir/containers.conf"
_ep_new="$(printf '# Written by scripts/ensure-podman.sh; see there for why.\n[containers]\ndefault_ulimits = ["nofile=%s:%s", "nproc=%s:%s"]\n\n[engine]\nruntime = "runc"\n' \
  "$_ep_nofile" "$_ep_nofile" "$_ep_nproc" "$_ep_nproc")"
[ "$(cat "$_ep_conf" 2>/dev/null)" = "$_ep_new" ] || printf '%s\n' "$_ep_new" > "$_ep_conf"
export CONTAINERS_CONF="$_ep_conf"
