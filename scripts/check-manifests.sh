#!/usr/bin/env bash
# The deployment manifests checked offline (part of `make deploy-check`):
#   1. kustomize renders deploy/kubernetes/base and every overlay (kubectl kustomize);
#   2. each rendering validates against the Kubernetes JSON schemas of the oldest and the
#      newest version we support (kubernetes-validate --strict: unknown fields and kinds
#      fail);
#   3. deploy/compose.yaml validates against the compose-spec schema (check-jsonschema);
#   4. promtool checks every Prometheus config and the alert rules.
# Before that, each validator is shown a broken input and must reject it (a validator
# that passes everything would make this script worthless).
#
# The validators live in their own venv, .venv-deploy (deploy/requirements-deploy.txt,
# every version pinned), made with PYTHON; promtool comes from Debian's prometheus package
# (scripts/ensure-prometheus.sh). Installing needs the package registries; validating
# does not: it runs in a network namespace with no network at all (`unshare -n`) where
# the kernel allows it. A part whose tool cannot be installed prints "SKIPPED: <part>:
# <reason>" and the script goes on; any check that runs and fails makes it exit 1.
# Usage: scripts/check-manifests.sh [PYTHON]   (default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
py="${1:-.venv/bin/python}"
venv="${MEDSERVE_DEPLOY_VENV:-.venv-deploy}"
req=deploy/requirements-deploy.txt
# Oldest and newest Kubernetes versions the manifests must be valid for (PodDisruption-
# Budget policy/v1, preStop sleep and the other fields used are in 1.30).
k8s_versions=(1.30.0 1.37.0)
overlays=(base overlays/cpu overlays/gpu)

failed=0
fail() { echo "FAILED: $*" >&2; failed=1; }
skipped=0
skip() { echo "SKIPPED: $*" >&2; skipped=1; }

# ---- install (network allowed) -------------------------------------------------------
validators=1
stamp="$venv/.installed-$(sha256sum "$req" | cut -c1-16)"
if [ ! -e "$stamp" ]; then
  echo "==> installing the manifest validators into $venv (pinned, $req)"
  if [ ! -x "$py" ]; then
    skip "kubernetes manifests and compose file: no python at $py to make $venv"
    validators=0
  elif { [ -x "$venv/bin/python" ] || "$py" -m venv "$venv"; } \
      && "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$req" \
      && "$venv/bin/python" -m pip check >/dev/null; then
    rm -f "$venv"/.installed-* && touch "$stamp"
  else
    skip "kubernetes manifests and compose file: pip could not install $req into $venv"
    validators=0
  fi
fi
scripts/ensure-prometheus.sh >&2 || true
promtool=1
if ! command -v promtool >/dev/null; then
  skip "prometheus config and rules: promtool is not installed and could not be (needs apt-get as root)"
  promtool=0
fi

# ---- validate (no network) -----------------------------------------------------------
if unshare -n true 2>/dev/null; then
  offline() { unshare -n -- "$@"; }
  echo "==> validating with no network (unshare -n)"
else
  offline() { "$@"; }
  echo "==> validating (unshare -n not permitted here: the network is not cut)"
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
kubectl="$venv/bin/kubectl"

# A copy of deploy/kubernetes whose secret files are placeholders: the generators need the
# files to exist, and an operator's real secrets never go into a rendering here.
stage_kubernetes() {  # stage_kubernetes DEST
  cp -r deploy/kubernetes "$1"
  local secrets="$1/base/secrets" f
  find "$secrets" -mindepth 1 ! -name README.md ! -name .gitignore -delete
  for f in audit.key audit-signing.key audit-signing.pub db-gateway-password db-owner-password db-ca.crt; do
    printf 'placeholder\n' > "$secrets/$f"
  done
}

# kubernetes-validate exits 0 on a kind it has no schema for (a CRD) and only warns:
# here that is a failure too (no CRDs in these manifests).
k8s_validate() {  # k8s_validate VERSION FILE
  local out rc=0
  out="$(offline "$venv/bin/kubernetes-validate" --strict --quiet -k "$1" "$2" 2>&1)" || rc=$?
  [ -n "$out" ] && printf '%s\n' "$out" >&2
  [ "$rc" = 0 ] && ! grep -q '^WARN' <<<"$out"
}

# Each validator must reject a broken input, or its passes mean nothing.
canaries() {
  local c="$tmp/canary"
  mkdir -p "$c"
  if [ "$validators" = 1 ]; then
    stage_kubernetes "$c/k8s"
    rm "$c/k8s/base/secrets/audit.key"
    if offline "$kubectl" kustomize "$c/k8s/base" >/dev/null 2>&1; then
      fail "canary: kustomize rendered a base whose secret file is missing"
    fi
    sed 's/readinessProbe:/readinesProbe:/' deploy/kubernetes/base/deployment.yaml > "$c/typo.yaml"
    if k8s_validate "${k8s_versions[0]}" "$c/typo.yaml" 2>/dev/null; then
      fail "canary: kubernetes-validate accepted a misspelled field (readinesProbe)"
    fi
    printf 'apiVersion: monitoring.coreos.com/v1\nkind: ServiceMonitor\nmetadata: {name: x}\n' > "$c/crd.yaml"
    if k8s_validate "${k8s_versions[0]}" "$c/crd.yaml" 2>/dev/null; then
      fail "canary: a kind without a schema passed"
    fi
    sed 's/^\(    \)read_only: true/\1read_onyl: true/' deploy/compose.yaml > "$c/compose.yaml"
    if ! grep -q read_onyl "$c/compose.yaml" \
        || offline "$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec \
          "$c/compose.yaml" >/dev/null 2>&1; then
      fail "canary: check-jsonschema accepted a misspelled compose key (read_onyl)"
    fi
  fi
  if [ "$promtool" = 1 ]; then
    sed 's/== 0$/== = 0/' deploy/prometheus/alerts.yml > "$c/alerts.yml"
    if offline promtool check rules "$c/alerts.yml" >/dev/null 2>&1; then
      fail "canary: promtool accepted a rule with a broken expression"
    fi
  fi
}
canaries
[ "$failed" = 0 ] && echo "==> canaries: every validator rejected its broken input"

if [ "$validators" = 1 ]; then
  stage_kubernetes "$tmp/k8s"
  for overlay in "${overlays[@]}"; do
    out="$tmp/$(tr / - <<<"$overlay").yaml"
    if ! offline "$kubectl" kustomize "$tmp/k8s/$overlay" > "$out"; then
      fail "kustomize could not render deploy/kubernetes/$overlay"
      continue
    fi
    for v in "${k8s_versions[@]}"; do
      if k8s_validate "$v" "$out"; then
        echo "ok: deploy/kubernetes/$overlay: $(grep -c '^kind:' "$out") resources valid for Kubernetes $v (strict)"
      else
        fail "deploy/kubernetes/$overlay against Kubernetes $v"
      fi
    done
  done
  if offline "$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose.yaml; then
    echo "ok: deploy/compose.yaml valid against the compose-spec schema"
  else
    fail "deploy/compose.yaml against the compose-spec schema"
  fi
fi

if [ "$promtool" = 1 ]; then
  # The compose stack's config as its container sees it: alerts.yml beside it.
  mkdir -p "$tmp/prom-compose"
  cp deploy/compose/prometheus.yml deploy/prometheus/alerts.yml "$tmp/prom-compose/"
  for config in deploy/prometheus/prometheus.yml "$tmp/prom-compose/prometheus.yml"; do
    offline promtool check config "$config" >/dev/null \
      && echo "ok: promtool check config ${config/#$tmp\/prom-compose/deploy\/compose}" \
      || fail "promtool check config $config"
  done
  offline promtool check rules deploy/prometheus/alerts.yml >/dev/null \
    && echo "ok: promtool check rules deploy/prometheus/alerts.yml" \
    || fail "promtool check rules deploy/prometheus/alerts.yml"
fi

if [ "$failed" != 0 ]; then
  echo "check-manifests: FAILED" >&2
  exit 1
fi
if [ "$skipped" = 1 ]; then
  echo "check-manifests: passed, with the SKIPPED parts above"
else
  echo "check-manifests: passed"
fi
