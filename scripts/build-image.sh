#!/usr/bin/env bash
# `make image`: build medserve's CPU image (Containerfile) with podman, with no container
# registry: the Python base comes from the Debian mirror this host already uses.
#
#   scripts/build-image.sh [extra `podman build` arguments, e.g. --no-cache]
#   (given to both passes of step 4, but --no-cache to the first only)
#
# Environment:
#   MEDSERVE_IMAGE_FILE            Containerfile (default) or Containerfile.vllm (the GPU
#                                  variant, `make image-gpu`; base: VLLM_IMAGE if set)
#   MEDSERVE_IMAGE                 tag to build (default localhost/medserve:latest, or
#                                  localhost/medserve:gpu for Containerfile.vllm)
#   PYTHON_IMAGE                   use this base instead of the local one (a site with a
#                                  registry: docker.io/library/python:3.11-slim)
#   MEDSERVE_LLAMA_WHEEL           a prebuilt llama-cpp-python wheel to use (default: the
#                                  portable one in scripts/setup-venv.sh's cache, if any;
#                                  "none": compile it in the build stage, portably)
#   MEDSERVE_IMAGE_MODELS          build arg MODELS (default: models)
#   MEDSERVE_IMAGE_DEFAULT_MODEL   build arg WITH_DEFAULT_MODEL (default: 1)
#
# Steps, each skipped when its result is there:
# 1. podman, buildah, runc, mmdebstrap from Debian (scripts/ensure-podman.sh).
# 2. localhost/medserve-base:<codename>: mmdebstrap of Debian's python3, python3-venv,
#    libgomp1, tzdata, ca-certificates from the host's own apt sources, `podman import`ed
#    (~50 s, 174 MB). Cached by that tag (and a label with the recipe's hash); rebuilt only
#    when missing or when the recipe changed.
# 3. localhost/medserve-python:<codename>: deploy/image/Containerfile.python, a stand-in for
#    python:3.11-slim (venv with pip on PATH), a few seconds.
# 4. The image, --format docker (keeps HEALTHCHECK). The host's trust store and pip
#    settings are bind-mounted for the build only (`podman build -v`: nothing of them is
#    written into a layer; scripts/check-image.sh checks): the CA bundle over the image's,
#    a generated pip.conf at /etc/pip.conf, and the host's constraint files, local indexes
#    and find-links directories at their own paths.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

if ! . scripts/ensure-podman.sh; then
  echo "build-image: podman is missing and cannot be installed here (see above)" >&2
  exit 1
fi
file="${MEDSERVE_IMAGE_FILE:-Containerfile}"
case "$file" in
  Containerfile.vllm) image="${MEDSERVE_IMAGE:-localhost/medserve:gpu}" ;;
  *) image="${MEDSERVE_IMAGE:-localhost/medserve:latest}" ;;
esac
work="$root/var/image-build"
mkdir -p "$work"
now() { date +%s.%N; }
took() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f} s')" "$1" "$(now)"; }

# --- 2. the base, from the host's Debian mirror ------------------------------------------
if [ "$file" = Containerfile.vllm ]; then
  # The GPU variant's base is the vLLM runtime (VLLM_IMAGE, default in the file): pulled
  # from a registry, or `podman load`ed beforehand on an air-gapped build host.
  base_args=()
  [ -z "${VLLM_IMAGE:-}" ] || base_args=(--build-arg "VLLM_IMAGE=$VLLM_IMAGE")
  echo "==> the GPU variant ($file) on ${VLLM_IMAGE:-the vLLM image named in $file}"
elif [ -z "${PYTHON_IMAGE:-}" ]; then
  codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
  sources=/etc/apt/sources.list.d/debian.sources
  [ -f "$sources" ] || sources=/etc/apt/sources.list
  if [ -z "$codename" ] || [ ! -f "$sources" ] || ! command -v mmdebstrap >/dev/null; then
    echo "build-image: no Debian codename or apt sources on this host; set PYTHON_IMAGE" >&2
    exit 1
  fi
  base="localhost/medserve-base:$codename"
  # Everything that decides the base's content, hashed into a label: a changed recipe
  # rebuilds it. 90no-pkgcache: apt-get in a later layer leaves no binary caches (77 MB).
  debstrap=(mmdebstrap --variant=apt --quiet
    --include=ca-certificates,python3,python3-venv,libgomp1,tzdata
    "--dpkgopt=path-exclude=/usr/share/man/*"
    "--dpkgopt=path-exclude=/usr/share/locale/*"
    "--dpkgopt=path-include=/usr/share/locale/locale.alias"
    "--dpkgopt=path-exclude=/usr/share/doc/*"
    "--dpkgopt=path-include=/usr/share/doc/*/copyright"
    '--customize-hook=printf "Dir::Cache::pkgcache \"\";\nDir::Cache::srcpkgcache \"\";\n" > "$1"/etc/apt/apt.conf.d/90no-pkgcache'
    '--customize-hook=rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin'
    "$codename" - "$sources")
  recipe="$( { printf '%s\n' "${debstrap[@]}"; cat "$sources"; } | sha256sum | cut -c1-16)"
  have="$(podman image inspect --format '{{index .Labels "medserve.base-recipe"}}' "$base" 2>/dev/null || true)"
  if [ "$have" != "$recipe" ]; then
    echo "==> building $base from the Debian mirror in $sources (mmdebstrap, ~1 min)"
    t0="$(now)"
    podman rmi "$base" >/dev/null 2>&1 || true
    "${debstrap[@]}" | podman import --quiet \
      --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' \
      --change "LABEL medserve.base-recipe=$recipe" - "$base" >/dev/null
    echo "    $base built in $(took "$t0")"
  fi
  PYTHON_IMAGE="localhost/medserve-python:$codename"
  echo "==> $PYTHON_IMAGE (stand-in for python:3.11-slim)"
  podman build --quiet --format docker --build-arg "BASE_IMAGE=$base" \
    -t "$PYTHON_IMAGE" -f deploy/image/Containerfile.python deploy/image >/dev/null
fi
if [ "$file" != Containerfile.vllm ]; then
  base_args=(--build-arg "PYTHON_IMAGE=$PYTHON_IMAGE"
    --build-arg "MODELS=${MEDSERVE_IMAGE_MODELS:-models}"
    --build-arg "WITH_DEFAULT_MODEL=${MEDSERVE_IMAGE_DEFAULT_MODEL:-1}")
fi

# --- the llama-cpp-python wheel: reuse the portable build, never a native one -------------
# scripts/setup-venv.sh caches wheels under sha256(machine, CMAKE_ARGS)[:12]; the portable
# build's args are -DGGML_NATIVE=OFF (its default). A wheel built with MEDSERVE_CMAKE_ARGS
# (e.g. native) sits under another key and is deliberately not used here.
pin="$(python3 - pyproject.toml <<'PY'
import re, sys, tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
print(next(m.group(1) for d in deps if (m := re.fullmatch(r"llama-cpp-python==(\S+)", d))))
PY
)"
cache_root="${MEDSERVE_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/medserve/wheels}"
portable_key="$(printf '%s\n' "$(uname -m)" "-DGGML_NATIVE=OFF" | sha256sum | cut -c1-12)"
wheel="${MEDSERVE_LLAMA_WHEEL:-}"  # "none": compile in the image even if one is cached
if [ -z "$wheel" ]; then
  wheel="$(ls "$cache_root/$portable_key"/llama_cpp_python-"$pin"-*.whl 2>/dev/null | head -n 1 || true)"
fi
rm -f deploy/image/wheels/llama_cpp_python-*.whl
[ "$wheel" != none ] || wheel=""
if [ -n "$wheel" ]; then
  cp "$wheel" deploy/image/wheels/
  echo "==> using the prebuilt llama-cpp-python wheel $wheel"
else
  echo "==> no portable llama-cpp-python $pin wheel in $cache_root/$portable_key:"
  echo "    the image compiles llama.cpp (GGML_NATIVE=OFF; 3-16 min on 2 cores)"
fi

# --- the host's CA bundle and pip settings, for the build only ----------------------------
mounts=()
targets=()  # every path mounted, for scripts/check-image.sh: none may exist in the image
bundle=""
for c in "${PIP_CERT:-}" "${SSL_CERT_FILE:-}" /etc/ssl/certs/ca-certificates.crt /etc/pki/tls/certs/ca-bundle.crt; do
  [ -n "$c" ] && [ -f "$c" ] && { bundle="$c"; break; }
done
if [ -n "$bundle" ]; then
  mounts+=(-v "$bundle:/etc/ssl/certs/ca-certificates.crt:ro")
fi
# The host's effective pip configuration (PIP_* environment, /etc/pip.conf,
# /etc/xdg/pip/pip.conf, the user's pip.conf), translated: local paths are mounted at the
# same paths, read-only.
python3 - "$work" <<'PY' > "$work/pip-mounts"
import configparser, os, re, subprocess, sys, urllib.parse

work = sys.argv[1]
# No pip on this host (Debian's python3 alone): no settings to carry, only the CA bundle.
out = subprocess.run(
    [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True
).stdout
conf: dict[str, str] = {}
for line in out.splitlines():  # global.find-links='/opt/wheels'  or  :env:.cert='...'
    m = re.fullmatch(r"(?::env:|global|install|download|wheel)\.([a-z-]+)='(.*)'", line)
    # The environment beats the files (pip's own order); the files come merged already.
    if m and (line.startswith(":env:") or m[1] not in conf):
        conf[m[1]] = m[2]
keep = {}
mounts = []
def local(path: str) -> None:
    if os.path.exists(path):
        mounts.append(os.path.realpath(path) + "\t" + path)
for key in ("index-url", "extra-index-url", "find-links"):
    vals = conf.get(key, "").split()
    kept = []
    for v in vals:
        u = urllib.parse.urlparse(v)
        path = urllib.parse.unquote(u.path) if u.scheme == "file" else "" if u.scheme else v
        if path and key != "find-links":
            # A local PEP 503 index (DIR/simple/) links its files relatively, usually to a
            # sibling directory (DIR/files/): mount the index's parent.
            path = os.path.dirname(path.rstrip("/"))
        if path:
            local(path)
        kept.append(v)
    if kept:
        keep[key] = " ".join(kept)
# Constraint files (here: /etc/xdg/pip's cap on torch) keep applying, under fixed names.
constraints = [c for c in conf.get("constraint", "").split() if os.path.isfile(c)]
for i, c in enumerate(constraints):
    mounts.append(f"{os.path.realpath(c)}\t/run/medserve-build/constraints-{i}.txt")
if constraints:
    keep["constraint"] = " ".join(
        f"/run/medserve-build/constraints-{i}.txt" for i in range(len(constraints))
    )
for key in ("timeout", "default-timeout", "retries", "trusted-host", "proxy"):
    if conf.get(key):
        keep["timeout" if key == "default-timeout" else key] = conf[key]
keep.setdefault("timeout", "180")
keep["cert"] = "/etc/ssl/certs/ca-certificates.crt"
keep["disable-pip-version-check"] = "true"
cp = configparser.ConfigParser()
cp["global"] = {k: v for k, v in keep.items() if v}
with open(os.path.join(work, "pip.conf"), "w") as f:
    f.write("# Generated by scripts/build-image.sh from this host's pip settings; mounted\n"
            "# at /etc/pip.conf during the build only.\n")
    cp.write(f)
print("\n".join(mounts))
PY
mounts+=(-v "$work/pip.conf:/etc/pip.conf:ro")
targets+=(/etc/pip.conf)
while IFS=$'\t' read -r src dst; do
  [ -n "$src" ] || continue
  mounts+=(-v "$src:$dst:ro")
  targets+=("$dst")
done < "$work/pip-mounts"
printf '%s\n' "${targets[@]}" > "$work/build-mounts"

# --- 4. the image --------------------------------------------------------------------------
# Two passes. `podman build -v` mounts into every RUN of every stage and leaves an empty
# mount point behind in each layer (/etc/pip.conf, /opt/pypi, ...). So the build stage, the
# only one that needs the index, is built first with the mounts (tagged as the cache), then
# the whole file without them: the build stage comes from that cache, the final stage never
# sees a host path (its RUNs install from the build stage's wheels with --no-index).
# If the cache were not reused, the second pass fails loudly (no CA, no index), it does not
# silently ship anything.
old="$(podman image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)"
old_cache="$(podman image inspect --format '{{.Id}}' "$image-build-cache" 2>/dev/null || true)"
args=(--format docker --layers -f "$file" "${base_args[@]}")
echo "==> building $image ($file)"
t0="$(now)"
# --no-cache applies to the first pass only (the second must reuse what the first built).
first=() second=()
for a in "$@"; do
  first+=("$a")
  [ "$a" = --no-cache ] || second+=("$a")
done
podman build "${args[@]}" --target build -t "$image-build-cache" "${mounts[@]}" "${first[@]}" .
podman build "${args[@]}" -t "$image" "${second[@]}" .
echo "==> $image built in $(took "$t0")"
# What the tags named before is now untagged: remove it (if nothing else uses it).
for pair in "$old:$image" "$old_cache:$image-build-cache"; do
  prev="${pair%%:*}"
  if [ -n "$prev" ] && [ "$prev" != "$(podman image inspect --format '{{.Id}}' "${pair#*:}")" ]; then
    podman rmi "$prev" >/dev/null 2>&1 || true
  fi
done
podman image inspect --format "    size: {{.Size}} bytes" "$image"
