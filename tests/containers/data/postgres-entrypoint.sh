#!/bin/sh
# A PostgreSQL container as the official postgres image makes one: a cluster initialised at the
# first start from POSTGRES_USER (default postgres) and POSTGRES_PASSWORD, local connections
# trusted, TCP with scram-sha-256; here with Debian 12's PostgreSQL 15 on DB_PORT (the test image
# runs with --network host, so not on the host's own 5432).
set -eu
D=/var/lib/postgresql/data
B=/usr/lib/postgresql/15/bin
mkdir -p "$D" /run/postgresql && chown postgres "$D" /run/postgresql && chmod 700 "$D"
if [ ! -s "$D/PG_VERSION" ]; then
  f=$(mktemp) && printf '%s\n' "$POSTGRES_PASSWORD" >"$f" && chown postgres "$f"
  runuser -u postgres -- "$B/initdb" -D "$D" -U "${POSTGRES_USER:-postgres}" --pwfile="$f" \
    --auth-local=trust --auth-host=scram-sha-256 >/dev/null
  rm -f "$f"
fi
exec runuser -u postgres -- "$B/postgres" -D "$D" -p "$DB_PORT" -c listen_addresses=127.0.0.1
