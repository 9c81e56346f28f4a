#!/usr/bin/env bash
# Create the secret files the compose stack or the Kubernetes base reads, in DIR:
#   deploy/make-secrets.sh deploy/secrets                    (compose.yaml)
#   deploy/make-secrets.sh deploy/kubernetes/base/secrets    (kustomize secretGenerator)
# Generated here: the audit secret (32 random bytes, hex), the Ed25519 checkpoint signing
# key (PEM, PKCS#8, as medserve writes it) with its public half, and random database (and Grafana) passwords.
# An existing file is never overwritten: rerunning is safe, rotating is deliberate.
# Needs openssl. Git ignores both folders. Keep audit.key and audit-signing.key in escrow.
#
# Modes: every file stays writable by you (the guide's `printf %s 'PASSWORD' > FILE` to set
# the password a database administrator chose works without root).
#   compose (any DIR not under kubernetes/): 0644. compose bind-mounts secret files as they
#     are, and the containers' users must read them (medserve uid 10001, PostgreSQL 999,
#     Grafana 472); the folder, mode 0700 and owned by you, keeps other users of the host out.
#   kubernetes: 0600. Only kustomize (you) reads them; the manifests set the modes inside
#     the pods (defaultMode).
set -euo pipefail
dir="${1:?usage: $0 DIR}"
install -d -m 0700 "$dir"
cd "$dir"
case "$dir" in
  */kubernetes/*) mode=0600 ;;
  *) mode=0644 ;;
esac

new() {  # new FILE COMMAND...: run COMMAND into FILE unless FILE exists
  local file="$1"; shift
  if [ -e "$file" ]; then echo "kept    $dir/$file"; return; fi
  (umask 077; "$@" > "$file.tmp") && mv "$file.tmp" "$file" && chmod "$mode" "$file"
  echo "created $dir/$file"
}
# No final newline: Kubernetes passes a Secret file byte for byte into PGPASSWORD.
password() { printf "%s" "$(openssl rand -hex 24)"; }

new audit.key openssl rand -hex 32
new audit-signing.key openssl genpkey -algorithm ed25519
# Its public half, for auditors (`medserve audit verify` checks the checkpoints with it).
new audit-signing.pub openssl pkey -in audit-signing.key -pubout
new db-owner-password password
new db-gateway-password password
case "$dir" in
  */kubernetes/*)
    echo "also needed here: db-ca.crt (the database's CA); see secrets/README.md" ;;
  *)
    new db-superuser-password password
    new db-auditor-password password
    new grafana-admin-password password ;;
esac
