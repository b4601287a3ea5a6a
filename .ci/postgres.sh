#!/usr/bin/env bash
# Start a local PostgreSQL for the storage contract tests and print its URL as the last line.
#
# Run as root on Debian 12. Idempotent: installs the server only if it is missing, creates the
# cluster, role and database only if they are missing, and resets the role's password.
# Progress goes to stderr, so that this works:
#   export BWRAFT_TEST_PG_URL="$(sudo .ci/postgres.sh)"
set -euo pipefail

ROLE=bwraft
PASSWORD=bwraft
DATABASE=bwraft

say() { echo "postgres.sh: $*" >&2; }

server_version() {
    # The newest installed server, e.g. "15" (from /usr/lib/postgresql/15/bin/postgres).
    local bin
    for bin in /usr/lib/postgresql/*/bin/postgres; do
        if [ -x "$bin" ]; then basename "$(dirname "$(dirname "$bin")")"; fi
    done | sort -n | tail -n 1
}

if ! command -v pg_ctlcluster >/dev/null 2>&1 || [ -z "$(server_version)" ]; then
    say "installing the PostgreSQL server"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update >&2
    apt-get install -y postgresql >&2
fi

VERSION="$(server_version)"
if [ -z "$VERSION" ]; then
    say "no PostgreSQL server found under /usr/lib/postgresql after installing"
    exit 1
fi

if ! pg_lsclusters --no-header | awk -v v="$VERSION" '$1 == v && $2 == "main" {found=1} END {exit !found}'; then
    say "creating cluster $VERSION/main"
    pg_createcluster "$VERSION" main >&2
fi

status="$(pg_lsclusters --no-header | awk -v v="$VERSION" '$1 == v && $2 == "main" {print $4}')"
if [ "$status" != "online" ]; then
    say "starting cluster $VERSION/main"
    pg_ctlcluster "$VERSION" main start >&2
fi
PORT="$(pg_lsclusters --no-header | awk -v v="$VERSION" '$1 == v && $2 == "main" {print $3}')"

# Wait on the server's answer rather than for a fixed time.
if ! pg_isready -q -h 127.0.0.1 -p "$PORT" -t 60; then
    say "the server on 127.0.0.1:$PORT did not come up; see /var/log/postgresql/"
    exit 1
fi

as_postgres() { runuser -u postgres -- psql -v ON_ERROR_STOP=1 -q -X -p "$PORT" "$@"; }

if [ "$(as_postgres -tAc "SELECT 1 FROM pg_roles WHERE rolname = '$ROLE'")" != "1" ]; then
    say "creating role $ROLE"
    as_postgres -c "CREATE ROLE $ROLE LOGIN PASSWORD '$PASSWORD'" >&2
else
    as_postgres -c "ALTER ROLE $ROLE LOGIN PASSWORD '$PASSWORD'" >&2
fi
if [ "$(as_postgres -tAc "SELECT 1 FROM pg_database WHERE datname = '$DATABASE'")" != "1" ]; then
    say "creating database $DATABASE"
    as_postgres -c "CREATE DATABASE $DATABASE OWNER $ROLE" >&2
fi

echo "postgresql+psycopg2://$ROLE:$PASSWORD@127.0.0.1:$PORT/$DATABASE"
