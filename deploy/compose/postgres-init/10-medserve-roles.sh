#!/bin/sh
# First start of the compose PostgreSQL (empty data volume): the medserve database and the
# three roles of the README ("Several gateways on one PostgreSQL"): the owner migrates and
# grants, the gateway only adds and reads audit records (and reads keys), the auditor
# reads. Passwords come from the mounted secret files; `medserve-migrate` then creates the
# tables and grants as the owner.
set -eu
pw() {  # the password in /run/secrets/NAME, without its final newline; never empty
  value="$(tr -d '\n' < "/run/secrets/$1")"
  [ -n "$value" ] || { echo "10-medserve-roles: /run/secrets/$1 is empty" >&2; exit 1; }
  printf '%s' "$value"
}
# Assignments, not arguments: a missing file stops the script here (set -e).
owner_pw="$(pw db_owner_password)"
gateway_pw="$(pw db_gateway_password)"
auditor_pw="$(pw db_auditor_password)"
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
  -v owner_pw="$owner_pw" -v gateway_pw="$gateway_pw" -v auditor_pw="$auditor_pw" <<'SQL'
CREATE ROLE medserve_owner LOGIN PASSWORD :'owner_pw';
CREATE ROLE medserve_gateway LOGIN PASSWORD :'gateway_pw';
CREATE ROLE medserve_auditor LOGIN PASSWORD :'auditor_pw';
CREATE DATABASE medserve OWNER medserve_owner;
REVOKE ALL ON DATABASE medserve FROM PUBLIC;
GRANT CONNECT ON DATABASE medserve TO medserve_gateway, medserve_auditor;
SQL
