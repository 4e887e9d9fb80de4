#!/usr/bin/env bash
# Brings up a local PostgreSQL for the tests, on a fresh Debian machine or one where it already
# runs (idempotent: every step checks before it acts). Runs as root, without systemd.
#
#   1. Installs Debian's `postgresql` package if no server binaries are present
#      (apt-get update, then apt-get install -y postgresql).
#   2. Makes sure a cluster exists for the newest installed major version (Debian's
#      `pg_createcluster <ver> main --port 5432` if the package did not create one).
#   3. Starts it as the postgres user with `pg_ctlcluster <ver> main start` unless a server already
#      answers on 127.0.0.1:5432 (first removing stale lock files left by a killed server),
#      and waits until it accepts TCP connections there.
#   4. Creates (or resets the password and rights of) the login role reft/reft with CREATEDB and
#      pg_signal_backend (to drop a test database an autovacuum worker is visiting), so
#      tests can create and drop a database per test, and the database reft_test owned by it.
#   5. Prints the URL on stdout (everything else goes to stderr), so a caller can do
#        export REFT_TEST_DATABASE_URL=$(bash .ci/postgres.sh)
#
# Debian's default pg_hba.conf allows password (scram-sha-256) logins over 127.0.0.1, which is
# what the URL uses; the role is created over the local socket with peer auth as postgres.
set -euo pipefail

PG_PORT=5432
PG_USER=reft
PG_PASSWORD=reft
PG_DB=reft_test
CLUSTER=main

log() { echo "postgres.sh: $*" >&2; }

# Runs a command as the postgres OS user (peer authentication on the local socket). `cd /`
# because postgres may not be allowed into the caller's working directory.
as_postgres() {
  if [ "$(id -u)" = 0 ]; then
    (cd / && runuser -u postgres -- "$@")
  else
    (cd / && sudo -n -u postgres -- "$@")
  fi
}

psql_admin() { as_postgres psql -X -q -v ON_ERROR_STOP=1 -p "$PG_PORT" -d postgres "$@"; }

# A server killed with SIGKILL (as a session's processes are when it ends) leaves its lock files
# (postmaster.pid, the socket's .lock) behind. The server ignores one whose pid is dead, but
# refuses to start if that pid now belongs to some other process, or to a not yet reaped zombie
# of itself. Such a lock file is stale: remove it.
remove_if_stale() {
  local file=$1 pid
  [ -f "$file" ] || return 0
  pid=$(head -n 1 "$file")
  if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" != postgres ] || grep -q '^State:[[:space:]]*Z' "/proc/$pid/status" 2>/dev/null; then
    log "removing stale $file (pid $pid is not a live postgres)"
    rm -f "$file"
  fi
}

newest_version() { ls /usr/lib/postgresql 2>/dev/null | sort -V | tail -n 1; }

# 1. Install.
if [ -z "$(newest_version)" ] || [ ! -x "/usr/lib/postgresql/$(newest_version)/bin/postgres" ]; then
  log "installing PostgreSQL from Debian's packages"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq postgresql >&2
fi
VERSION=$(newest_version)

# 2. Cluster. (The package's postinst normally creates "main"; a machine restored without it,
# or an install with create_main_cluster = false, would not have one.)
if ! pg_lsclusters -h | awk -v v="$VERSION" -v c="$CLUSTER" '$1 == v && $2 == c { found = 1 } END { exit !found }'; then
  log "creating cluster $VERSION/$CLUSTER on port $PG_PORT"
  pg_createcluster "$VERSION" "$CLUSTER" --port "$PG_PORT" >&2
fi
port=$(pg_lsclusters -h | awk -v v="$VERSION" -v c="$CLUSTER" '$1 == v && $2 == c { print $3 }')
if [ "$port" != "$PG_PORT" ]; then
  log "cluster $VERSION/$CLUSTER listens on port $port, not $PG_PORT: fix its postgresql.conf"
  exit 1
fi

# 3. Start, unless a server already answers on the port (pg_isready exits 2 when nothing does).
# The socket directory lives under /run, which is empty after a reboot.
install -d -o postgres -g postgres -m 2775 /var/run/postgresql
isready=0
pg_isready -q -h 127.0.0.1 -p "$PG_PORT" || isready=$?
if [ "$isready" = 2 ]; then
  datadir=$(pg_lsclusters -h | awk -v v="$VERSION" -v c="$CLUSTER" '$1 == v && $2 == c { print $6 }')
  remove_if_stale "$datadir/postmaster.pid"
  remove_if_stale "/var/run/postgresql/.s.PGSQL.$PG_PORT.lock"
  log "starting cluster $VERSION/$CLUSTER"
  # Tolerated: a concurrent start makes this fail with "already running"; the wait below decides.
  pg_ctlcluster "$VERSION" "$CLUSTER" start >&2 || log "pg_ctlcluster start failed; waiting for the server anyway"
fi
for _ in $(seq 1 60); do
  if pg_isready -q -h 127.0.0.1 -p "$PG_PORT"; then break; fi
  sleep 0.5
done
if ! pg_isready -q -h 127.0.0.1 -p "$PG_PORT"; then
  log "PostgreSQL did not accept connections on 127.0.0.1:$PG_PORT; see /var/log/postgresql/postgresql-$VERSION-$CLUSTER.log"
  exit 1
fi

# 4. Role and database. ALTER on every run, so a role left with another password is fixed too.
psql_admin <<SQL
SELECT 'CREATE ROLE $PG_USER' WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '$PG_USER') \gexec
ALTER ROLE $PG_USER WITH LOGIN CREATEDB PASSWORD '$PG_PASSWORD';
-- DROP DATABASE ... WITH (FORCE) must end an autovacuum worker that may have just started on a
-- test database; that worker runs as the superuser, so the test role needs pg_signal_backend.
GRANT pg_signal_backend TO $PG_USER;
SELECT 'CREATE DATABASE $PG_DB OWNER $PG_USER' WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = '$PG_DB') \gexec
SQL

# 5. The URL, checked by logging in with it.
URL="postgres://$PG_USER:$PG_PASSWORD@127.0.0.1:$PG_PORT/$PG_DB"
PGCONNECT_TIMEOUT=5 psql -X -q -v ON_ERROR_STOP=1 "$URL" -c 'SELECT 1' >/dev/null
log "PostgreSQL $VERSION ready"
echo "$URL"
