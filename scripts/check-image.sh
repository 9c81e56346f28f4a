#!/usr/bin/env bash
# The image part of `make deploy-check`: build localhost/medserve:latest (scripts/build-image.sh),
# check what it declares, then run it and ask it /health and a chat completion.
#
# 1. podman & co. from Debian (scripts/ensure-podman.sh). Not installable here (no apt-get,
#    not root): SKIPPED with the reason, exit 0. Once they are there, any failure exits 1.
# 2. Build (cached layers make a second run take seconds).
# 3. Static, from `podman image inspect` and the image's files (no container needed): a
#    non-root numeric user, every medserve.privacy.OFFLINE_ENV variable at its value, only
#    8000/tcp exposed, a HEALTHCHECK, the audit volume at /var/lib/medserve, nothing of the
#    build-time mounts (pip.conf, the host's indexes, its private CAs) left in the image.
# 4. Run it: published on 127.0.0.1 only (a free port), /health within a deadline, a key
#    made with `podman exec ... medserve keys create --json`, one chat completion, the prompt
#    absent from the container's log, `podman healthcheck run`, a clean stop on SIGTERM.
#    Then again with --read-only --cap-drop=ALL --security-opt no-new-privileges.
#    If this machine cannot run a container at all, 4 is SKIPPED, saying what failed.
# 5. Containerfile.vllm (the GPU variant): its vLLM base cannot be pulled here, so its steps
#    run on a stand-in base, and the result gets the checks of 3; then it is removed.
# Every container and volume made here is removed on exit; the image is kept (make image).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

if ! . scripts/ensure-podman.sh; then
  echo "SKIPPED: image: podman/buildah/runc/mmdebstrap are missing and cannot be installed here (needs apt-get as root)"
  exit 0
fi
image="${MEDSERVE_IMAGE:-localhost/medserve:latest}"
export MEDSERVE_IMAGE="$image"
command -v curl >/dev/null || { echo "check-image: FAILED: curl is needed (apt-get install curl)" >&2; exit 1; }
name="medserve-check-$$"
health_deadline_s="${MEDSERVE_CHECK_HEALTH_DEADLINE_S:-240}"
now() { date +%s.%N; }
took() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f} s')" "$1" "$(now)"; }
fail() { echo "check-image: FAILED: $*" >&2; exit 1; }
cleanup() {
  for c in "$name-a" "$name-b" "$name-probe"; do podman rm -f -v -t 5 "$c" >/dev/null 2>&1 || true; done
  for v in "$name-a" "$name-b" "$name-b-checkpoints"; do podman volume rm -f "$v" >/dev/null 2>&1 || true; done
  [ -n "${mnt:-}" ] && podman image unmount "$image" >/dev/null 2>&1 || true
  if [ -n "${gpu_image:-}" ]; then
    podman rmi "$gpu_image" "$gpu_image-build-cache" "$gpu_base" >/dev/null 2>&1 || true
  fi
}
trap cleanup EXIT

# --- 2. build -------------------------------------------------------------------------------
t0="$(now)"
scripts/build-image.sh || fail "scripts/build-image.sh (output above)"
echo "check-image: build $(took "$t0")"

# --- 3. what the image declares -----------------------------------------------------------
# check_config IMAGE: the checks on `podman image inspect` (both variants).
check_config() {
  podman image inspect "$1" > var/image-build/inspect.json
  python3 - var/image-build/inspect.json medserve/privacy.py "$1" <<'PY' || fail "$1: image configuration (above)"
import ast, json, sys

data = json.load(open(sys.argv[1]))[0]
cfg = data["Config"]
tree = ast.parse(open(sys.argv[2]).read())
offline = next(
    ast.literal_eval(node.value)
    for node in ast.walk(tree)
    if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "OFFLINE_ENV"
)
env = dict(e.split("=", 1) for e in cfg.get("Env") or [])
problems = []
user = (cfg.get("User") or "").split(":")[0]
if user in ("", "0", "root"):
    problems.append(f"user is {user or 'unset (root)'}")
for k, v in offline.items():
    if env.get(k) != v:
        problems.append(f"{k}={env.get(k)!r}, want {v!r}")
ports = sorted(cfg.get("ExposedPorts") or {})
if ports != ["8000/tcp"]:
    problems.append(f"exposed ports {ports}, want only 8000/tcp")
hc = data.get("Healthcheck") or cfg.get("Healthcheck") or {}  # podman puts it at the top
if not hc.get("Test"):
    problems.append("no HEALTHCHECK (built without --format docker?)")
if "/var/lib/medserve" not in (cfg.get("Volumes") or {}):
    problems.append("no volume at /var/lib/medserve")
# Settings come from the file MEDSERVE_CONFIG names (a site mounts its own there); a
# MEDSERVE_* setting baked as ENV would override that file silently.
if env.get("MEDSERVE_CONFIG") != "/etc/medserve/medserve.toml":
    problems.append(f"MEDSERVE_CONFIG={env.get('MEDSERVE_CONFIG')!r}")
baked = sorted(k for k in env if k.startswith("MEDSERVE_") and k != "MEDSERVE_CONFIG")
if baked:
    problems.append(f"settings baked as ENV (they beat a mounted file): {baked}")
for p in problems:
    print(f"  {sys.argv[3]}:", p)
if not problems:
    print(f"check-image: {sys.argv[3]}: config ok (user {cfg['User']}, all {len(offline)} "
          f"offline variables, ports {ports}, a healthcheck, volume /var/lib/medserve)")
sys.exit(1 if problems else 0)
PY
}
check_config "$image"

# The image's files, without running it: nothing the build mounted may be there.
mnt="$(podman image mount "$image")"
leftover=()
while read -r p; do
  [ -n "$p" ] && [ "$p" != /etc/ssl/certs/ca-certificates.crt ] && [ -e "$mnt$p" ] && leftover+=("$p")
done < var/image-build/build-mounts
[ "${#leftover[@]}" = 0 ] || fail "build-time mount points left in the image: ${leftover[*]}"
for crt in /usr/local/share/ca-certificates/*.crt; do
  [ -f "$crt" ] || continue
  body="$(grep -v -- '-----' "$crt" | tr -d '\n' | cut -c1-200)"
  if tr -d '\n' < "$mnt/etc/ssl/certs/ca-certificates.crt" | grep -qF -- "$body"; then
    fail "the host's local CA $crt is in the image's CA bundle"
  fi
done
(cd "$mnt" && du -sh var/cache/apt var/lib/apt/lists) | sed "s/^/check-image: apt leftovers: /"
podman image unmount "$image" >/dev/null; mnt=""
echo "check-image: no build-time mount, pip setting or host CA in the image"

# --- 5. the GPU variant ----------------------------------------------------------------------
# Its base (vllm/vllm-openai) cannot be pulled here and there is no GPU, so every step of
# Containerfile.vllm runs on a stand-in base instead (the Python stand-in plus a package
# named vllm, deploy/image/Containerfile.vllm-standin), and the result is checked like the
# CPU image, then removed. What this cannot show: that the real vLLM image has python3-venv,
# groupadd/useradd and a python3 with vllm (its Dockerfile installs them; the build checks
# the last one), and anything about CUDA.
codename="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
gpu_base="localhost/medserve-vllm-standin:check"
gpu_image="localhost/medserve:gpu-check"
t0="$(now)"
podman build --quiet --format docker --build-arg "BASE_IMAGE=${PYTHON_IMAGE:-localhost/medserve-python:$codename}" \
  -t "$gpu_base" -f deploy/image/Containerfile.vllm-standin deploy/image >/dev/null \
  || fail "the vLLM stand-in base"
MEDSERVE_IMAGE_FILE=Containerfile.vllm VLLM_IMAGE="$gpu_base" MEDSERVE_IMAGE="$gpu_image" \
  scripts/build-image.sh >var/image-build/gpu-build.log 2>&1 \
  || { tail -20 var/image-build/gpu-build.log; fail "Containerfile.vllm on the stand-in base (var/image-build/gpu-build.log)"; }
check_config "$gpu_image"
echo "check-image: Containerfile.vllm built on the stand-in base in $(took "$t0") (not the real vLLM image: no registry, no GPU here)"

# --- 4. run it ------------------------------------------------------------------------------
if ! probe="$(podman run --rm --name "$name-probe" --network none --no-healthcheck "$image" true 2>&1)"; then
  echo "SKIPPED: image run: this machine cannot run a container: \`podman run --rm --network none $image true\` failed:"
  printf '%s\n' "$probe" | sed 's/^/    /'
  echo "    run instead: the build, the configuration and file checks above (all passed)"
  exit 0
fi

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# wait_health CONTAINER PORT: poll /health until 200, the container exits, or the deadline.
wait_health() {
  local c="$1" port="$2" t0 deadline
  t0="$(now)"
  deadline=$(( $(date +%s) + health_deadline_s ))
  until curl -sf -o /dev/null "http://127.0.0.1:$port/health"; do
    if [ "$(podman inspect --format '{{.State.Running}}' "$c")" != true ]; then
      podman logs --tail 30 "$c" >&2 || true
      fail "$c exited before /health answered"
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      podman logs --tail 30 "$c" >&2 || true
      fail "$c: no /health 200 within ${health_deadline_s}s"
    fi
    sleep 0.5
  done
  echo "check-image: $c: /health 200 after $(took "$t0")"
}

# chat CONTAINER PORT: a key made inside the container, one completion through the port.
chat() {
  local c="$1" port="$2" key t0 code marker
  key="$(podman exec "$c" medserve keys create --name "check-$c" --json \
    | python3 -c 'import json, sys; print(json.load(sys.stdin)["key"])')" \
    || fail "$c: medserve keys create --json"
  marker="check-image-marker-$RANDOM$RANDOM"
  t0="$(now)"
  code="$(curl -s -o var/image-build/chat.json -w '%{http_code}' --max-time 120 \
    "http://127.0.0.1:$port/v1/chat/completions" \
    -H "Authorization: Bearer $key" -H 'Content-Type: application/json' \
    -d "{\"model\":\"smollm2-135m-instruct\",\"max_tokens\":16,\"messages\":[{\"role\":\"user\",\"content\":\"Say hi. $marker\"}]}")"
  [ "$code" = 200 ] || { cat var/image-build/chat.json >&2; fail "$c: chat completion answered $code"; }
  python3 - var/image-build/chat.json <<'PY' || fail "$c: the chat completion is not an OpenAI chat.completion"
import json, sys
body = json.load(open(sys.argv[1]))
assert body["object"] == "chat.completion", body.get("object")
assert body["choices"][0]["message"]["role"] == "assistant"
assert body["usage"]["completion_tokens"] >= 1
PY
  echo "check-image: $c: chat completion 200 in $(took "$t0")"
  if podman logs "$c" 2>&1 | grep -qF "$marker"; then
    fail "$c: the prompt appears in the container's log"
  fi
}

# A: as a site runs it by default.
port_a="$(free_port)"
podman run -d --name "$name-a" -p "127.0.0.1:$port_a:8000" -v "$name-a:/var/lib/medserve" \
  "$image" >/dev/null 2> >(grep -v 'systemd connection' >&2)
wait_health "$name-a" "$port_a"
ports="$(podman port "$name-a")"
[ "$ports" = "8000/tcp -> 127.0.0.1:$port_a" ] || fail "$name-a publishes: $ports"
chat "$name-a" "$port_a"
podman healthcheck run "$name-a" >/dev/null || fail "$name-a: podman healthcheck run"
echo "check-image: $name-a: podman healthcheck run: healthy"
uid="$(podman exec "$name-a" id -u)"
[ "$uid" != 0 ] || fail "$name-a runs as root"
podman exec "$name-a" test -s /var/lib/medserve/audit.db || fail "$name-a: no audit.db on the volume"
t0="$(now)"
podman stop -t 30 "$name-a" >/dev/null
code="$(podman inspect --format '{{.State.ExitCode}}' "$name-a")"
[ "$code" = 0 ] || fail "$name-a: exit code $code after SIGTERM (want 0)"
echo "check-image: $name-a: uid $uid, audit.db on the volume, stopped by SIGTERM in $(took "$t0") (exit 0)"

# B: hardened: read-only root, no capabilities, no privilege escalation; a site's settings
# file mounted over the image's (it must take effect: no baked ENV may override it), with
# the checkpoints on a second named volume (empty: it takes the image directory's owner).
port_b="$(free_port)"
cat > var/image-build/site.toml <<'TOML'
host = "0.0.0.0"
port = 8000
models_dir = "/srv/medserve/models"
state_dir = "/var/lib/medserve/state"
[audit]
path = "/var/lib/medserve/site-audit.db"
checkpoint_file = "/var/lib/medserve-checkpoints/checkpoints.jsonl"
checkpoint_every = 1
[auth]
keys_path = "/var/lib/medserve/site-keys.db"
TOML
chmod 0644 var/image-build/site.toml
podman run -d --name "$name-b" -p "127.0.0.1:$port_b:8000" -v "$name-b:/var/lib/medserve" \
  -v "$name-b-checkpoints:/var/lib/medserve-checkpoints" \
  -v "$PWD/var/image-build/site.toml:/etc/medserve/medserve.toml:ro" \
  --read-only --cap-drop=ALL --security-opt no-new-privileges \
  "$image" >/dev/null 2> >(grep -v 'systemd connection' >&2)
wait_health "$name-b" "$port_b"
chat "$name-b" "$port_b"
podman healthcheck run "$name-b" >/dev/null || fail "$name-b: podman healthcheck run"
echo "check-image: $name-b (--read-only --cap-drop=ALL --security-opt no-new-privileges): healthy"
for f in /var/lib/medserve/site-audit.db /var/lib/medserve/site-keys.db \
    /var/lib/medserve-checkpoints/checkpoints.jsonl; do
  podman exec "$name-b" test -s "$f" || fail "$name-b: the mounted settings file was not used: no $f"
done
podman exec "$name-b" test ! -e /var/lib/medserve/audit.db \
  || fail "$name-b: audit.db written although the mounted settings file names site-audit.db"
podman exec "$name-b" medserve audit verify >/dev/null \
  || fail "$name-b: medserve audit verify (exec'd, reading the same settings file)"
echo "check-image: $name-b: the mounted settings file took effect (audit log, keys, checkpoints on their volume); exec'd audit verify: intact"

echo "check-image: size $(podman image inspect --format '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1/1e6}'); layers:"
podman history --format '{{.Size}}\t{{.CreatedBy}}' "$image" | awk -F'\t' '$1 != "0 B"' \
  | cut -c1-110 | sed 's/^/    /'
echo "check-image: all passed"
