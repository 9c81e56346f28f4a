#!/usr/bin/env bash
# `make deploy-check`: the deployment files checked offline, then the image built and
# smoke-tested. Each part is its own script so it can be run alone:
#   scripts/check-units.sh       systemd-analyze verify + security score of deploy/systemd/*
#   scripts/check-manifests.sh   kustomize render + Kubernetes schemas, compose file, promtool
#   scripts/check-image.sh       podman build from Debian's packages, /health + chat, offline env
# Usage: scripts/deploy-check.sh [PYTHON]   (the project's venv python, for the validators)
set -euo pipefail
cd "$(dirname "$0")/.."
py="${1:-.venv/bin/python}"
scripts/check-units.sh
scripts/check-manifests.sh "$py"
scripts/check-image.sh
echo "deploy-check: all passed"
