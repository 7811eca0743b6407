#!/usr/bin/env bash
# Runs once, when the PostgreSQL volume is created (docker-entrypoint-initdb.d): the login roles
# the two contexts serve as. `gozon migrate` (as the owner, POSTGRES_USER) then grants each DML
# on its own schema only.
set -euo pipefail
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v orders_password="$GOZON_ORDERS_DB_PASSWORD" -v payments_password="$GOZON_PAYMENTS_DB_PASSWORD" <<'SQL'
CREATE ROLE gozon_orders LOGIN PASSWORD :'orders_password';
CREATE ROLE gozon_payments LOGIN PASSWORD :'payments_password';
SQL
