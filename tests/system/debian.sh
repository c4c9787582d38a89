#!/usr/bin/env bash
# sweeperd as a user installs it: a minimal Debian 12 root (debootstrap), booted with its own
# systemd 252 (systemd-nspawn -b), Debian's PostgreSQL 15 inside, sweeperd installed the way the
# README's "Running as a service" says. Checks start-up (and the message when libnss-systemd is
# missing), STATUS, journal priorities, one sweep's effect, operator commands beside a
# credential-based unit, reload (good and broken), stop (idle, mid-query, "now"), a config error
# at start (no restart loop), enable + reboot, systemd-analyze verify and security.
#
#   sudo bash tests/system/debian.sh        # as root; needs debootstrap and systemd-container
#
# The Debian root is built once and cached in $SWEEPERD_SYSTEM_CACHE (default
# /var/tmp/sweeperd-system); every run boots a fresh copy of it. Exit status: 0 all checks
# passed, 1 a check failed, 77 this machine cannot run the test (said why).
set -Eeuo pipefail

REPO=$(cd "$(dirname "$0")/../.." && pwd)
CACHE=${SWEEPERD_SYSTEM_CACHE:-/var/tmp/sweeperd-system}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
# What the base root holds; changing it rebuilds the cache.
BASE_PACKAGES="python3 python3-venv postgresql-15 procps"
BASE_KEY=$(printf '%s\n' 3 "$SUITE" "$MIRROR" "$BASE_PACKAGES" | sha256sum | cut -c1-12)
BASE=$CACHE/base-$BASE_KEY
ROOT=$CACHE/run
CONSOLE=$CACHE/console.log
NSPAWN_PID=
LEADER=
FAILED=0
START=$SECONDS

skip() { echo "SKIP: $*" >&2; exit 77; }
note() { printf '[%4ss] %s\n' "$((SECONDS - START))" "$*"; }
pass() { printf '[%4ss] PASS  %s\n' "$((SECONDS - START))" "$*"; }
fail() { printf '[%4ss] FAIL  %s\n' "$((SECONDS - START))" "$*"; FAILED=1; }
# check WHAT COMMAND...: a PASS or FAIL line; the run goes on either way.
check() { local what=$1; shift; if "$@"; then pass "$what"; else fail "$what"; fi; }
# must WHAT COMMAND...: like check, but later checks depend on it: a failure ends the run.
must() { local what=$1; shift; if "$@"; then pass "$what"; else fail "$what"; finish; fi; }

[[ $(id -u) == 0 ]] || skip "must run as root (debootstrap, systemd-nspawn)"
for tool in debootstrap systemd-nspawn nsenter; do
  command -v "$tool" >/dev/null || skip "$tool not found (apt-get install debootstrap systemd-container util-linux)"
done

# -- the cached base root ------------------------------------------------------------------------
build_base() {
  local tmp=$BASE.tmp
  rm -rf "$tmp"
  note "building the Debian $SUITE root in $BASE (once; later runs reuse it)"
  debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,ca-certificates \
    "$SUITE" "$tmp" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
    || { tail -5 "$CACHE/debootstrap.log" >&2; skip "debootstrap failed (no Debian mirror?)"; }
  # Services must not start inside the chroot while packages install.
  printf '#!/bin/sh\nexit 101\n' >"$tmp/usr/sbin/policy-rc.d"
  chmod +x "$tmp/usr/sbin/policy-rc.d"
  chroot "$tmp" sh -c "apt-get update -qq && DEBIAN_FRONTEND=noninteractive \
      apt-get install -y -qq --no-install-recommends $BASE_PACKAGES \
      && apt-get install -y -qq --download-only libnss-systemd" >"$CACHE/apt.log" 2>&1 \
    || { tail -5 "$CACHE/apt.log" >&2; skip "installing Debian packages into the root failed"; }
  rm "$tmp/usr/sbin/policy-rc.d"
  echo sweeperd-test >"$tmp/etc/hostname"
  # The journal of the test boots is what we read; keep it in memory.
  mkdir -p "$tmp/etc/systemd/journald.conf.d"
  printf '[Journal]\nStorage=volatile\n' >"$tmp/etc/systemd/journald.conf.d/volatile.conf"
  mv "$tmp" "$BASE"
}

mkdir -p "$CACHE"
# One run at a time per cache: the next run reuses the same root directory.
exec 9>"$CACHE/lock"
flock -n 9 || skip "another run holds $CACHE/lock"
[[ -d $BASE ]] || build_base
for old in "$CACHE"/base-*; do [[ $old == "$BASE" ]] || rm -rf "$old"; done

# -- booting and talking to the container -------------------------------------------------------
boot() {
  : >"$CONSOLE"
  systemd-nspawn -D "$ROOT" -b --register=no --keep-unit --private-network -q --pipe \
    </dev/null >>"$CONSOLE" 2>&1 &
  NSPAWN_PID=$!
  LEADER=
  local i
  for i in $(seq 1 300); do
    LEADER=$(pgrep -P "$NSPAWN_PID" | head -n 1 || true)
    if [[ -n $LEADER ]]; then
      local state
      state=$(inside systemctl is-system-running 2>/dev/null || true)
      [[ $state == running || $state == degraded ]] && return 0
    fi
    kill -0 "$NSPAWN_PID" 2>/dev/null || break
    sleep 0.2
  done
  tail -20 "$CONSOLE" >&2
  return 1
}

inside() {
  nsenter -t "$LEADER" -a -- env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 "$@"
}

shutdown_container() {
  if [[ -n $NSPAWN_PID ]] && kill -0 "$NSPAWN_PID" 2>/dev/null; then
    inside systemctl poweroff >/dev/null 2>&1 || kill "$NSPAWN_PID" 2>/dev/null || true
    for _ in $(seq 1 150); do kill -0 "$NSPAWN_PID" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$NSPAWN_PID" 2>/dev/null || true
  fi
  NSPAWN_PID=
}

finish() {
  shutdown_container
  if (( FAILED )); then
    note "journal of sweeperd (last 40 lines) and the console are in $CACHE"
    echo "RESULT: FAILED after $((SECONDS - START))s"
    exit 1
  fi
  echo "RESULT: all checks passed in $((SECONDS - START))s"
  exit 0
}
trap 'shutdown_container' EXIT
trap 'echo "FAIL  unexpected error (exit $?) at line $LINENO: $BASH_COMMAND" >&2' ERR

psql_app() { inside runuser -u postgres -- psql -X -qAt -d app -c "$1"; }
unit_show() { inside systemctl show sweeperd -p "$1" --value; }
unit_is() { [[ $(unit_show "$1") == "$2" ]]; }
MARK=0
# mark_journal: later journal_* calls see only what sweeperd logs from now on. By time, not by
# cursor: a cursor whose entry the journal has rotated away makes journalctl show nothing.
mark_journal() { MARK=$(inside date +%s%6N); }
# journal_since [PRIORITY]: the messages since the mark, at PRIORITY (0-7) or more urgent.
journal_since() {
  inside journalctl -u sweeperd --no-pager -q -o json --since "@$((MARK / 1000000 - 1))" \
    | python3 -c '
import json, sys
limit, mark = int(sys.argv[1]), int(sys.argv[2])
for line in sys.stdin:
    entry = json.loads(line)
    if int(entry["__REALTIME_TIMESTAMP"]) < mark:
        continue
    if int(entry.get("PRIORITY", 6)) <= limit and isinstance(entry.get("MESSAGE"), str):
        print(entry["MESSAGE"])' "${1:-7}" "$MARK"
}
# journal_has PATTERN [PRIORITY]: a message since the mark matches the extended regex.
journal_has() {
  local lines
  lines=$(journal_since "${2:-7}")
  grep -Eq -- "$1" <<<"$lines" && return 0
  # Say what was there instead: a failing check must be diagnosable from the CI log alone.
  printf '         journal since the mark (priority <= %s), last lines:\n' "${2:-7}"
  tail -n 8 <<<"$lines" | sed 's/^/           | /'
  return 1
}
journal_quiet_at() { [[ -z $(journal_since "$1") ]]; }
# wait_for SECONDS COMMAND...: until it succeeds.
wait_for() {
  local limit=$1 i; shift
  for i in $(seq 1 $((limit * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  return 1
}
status_matches() { [[ $(unit_show StatusText) =~ $1 ]]; }
is_state() { [[ $(inside systemctl is-active sweeperd || true) == "$1" ]]; }
naps() { psql_app "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE 'SELECT pg_sleep%'"; }
napping() { [[ $(naps) -ge 1 ]]; }
no_naps() { [[ $(naps) == 0 ]]; }
rows_are() { [[ "$(psql_app 'SELECT count(*) FROM tenant_a.events') $(psql_app 'SELECT count(*) FROM tenant_b.events')" == "$1" ]]; }
in_output() { grep -Eq -- "$1" <<<"$2"; }

# -- a fresh copy of the root, and the README's installation steps ------------------------------
# A container left behind by an interrupted run (the lock says no run is going): end it.
if pkill -f "^systemd-nspawn -D $ROOT " 2>/dev/null; then
  for _ in $(seq 1 100); do pgrep -f "^systemd-nspawn -D $ROOT " >/dev/null || break; sleep 0.2; done
fi
note "copying the root"
rm -rf "$ROOT"
cp -a "$BASE" "$ROOT"
mkdir -p "$ROOT/usr/src/sweeperd"
tar -C "$REPO" --exclude=./.venv --exclude=./.git --exclude='*.egg-info' -cf - . \
  | tar -C "$ROOT/usr/src/sweeperd" -xf -

note "installing sweeperd as the README says (pip needs PyPI: the root shares the network here)"
# The host's CA bundle and index settings: machines behind a TLS-inspecting proxy trust its CA
# there, and pip inside the root must too.
pip_env=()
if [[ -r /etc/ssl/certs/ca-certificates.crt ]]; then
  cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/host-ca-certificates.crt"
  pip_env+=(--setenv=PIP_CERT=/etc/ssl/host-ca-certificates.crt)
fi
for var in PIP_INDEX_URL PIP_EXTRA_INDEX_URL HTTPS_PROXY HTTP_PROXY https_proxy http_proxy; do
  [[ -n ${!var:-} && ${!var} != file:* ]] && pip_env+=("--setenv=$var=${!var}")
done
systemd-nspawn -D "$ROOT" --register=no --keep-unit -q --pipe "${pip_env[@]}" -- sh -euc '
  cd /usr/src/sweeperd
  python3 -m venv /opt/sweeperd && /opt/sweeperd/bin/pip install -q /usr/src/sweeperd
  install -d -m 0755 /etc/sweeperd
  install -m 0644 systemd/sweeperd.service /etc/systemd/system/
  install -D -m 0644 README.md /usr/share/doc/sweeperd/README.md
' >"$CACHE/install.log" 2>&1 || { tail -20 "$CACHE/install.log"; fail "pip install"; finish; }
pass "README install steps (venv, pip install, unit, docs)"

# The secret, as the README says: root-only, handed over as a credential.
install -d -m 0700 "$ROOT/etc/sweeperd/credentials"
printf 'host=/run/postgresql dbname=app\n' >"$ROOT/etc/sweeperd/credentials/main-dsn"
chmod 0600 "$ROOT/etc/sweeperd/credentials/main-dsn"
install -d "$ROOT/etc/systemd/system/sweeperd.service.d"
printf '[Service]\nLoadCredential=main-dsn:/etc/sweeperd/credentials/main-dsn\n' \
  >"$ROOT/etc/systemd/system/sweeperd.service.d/credentials.conf"
install -d -m 0755 "$ROOT/etc/sweeperd/plugins"
cat >"$ROOT/etc/sweeperd/plugins/nap.py" <<'EOF'
"""A drop-in for the stop checks: a statement that runs until cancelled."""
import sweeperd


async def nap(ctx):
    await ctx.conn.execute("SELECT pg_sleep(600)")


@sweeperd.hookimpl
def sweeperd_operations(settings):
    return [sweeperd.Operation(name="nap.sleep", run=nap, tables=("events",))]
EOF

# write_config [EXTRA_TOML]: the service's config; interval 10s retention on two tenants.
write_config() {
  cat >"$ROOT/etc/sweeperd/sweeperd.toml.new" <<EOF
[daemon]
drain_timeout = "${DRAIN:-5s}"
plugin_dirs = ["/etc/sweeperd/plugins"]

[databases.main]
dsn_credential = "main-dsn"

[[tenants]]
name = "a"
database = "main"
schema = "tenant_a"

[[tenants]]
name = "b"
database = "main"
schema = "tenant_b"

[sweeps.often]
interval = "10s"
operations = ["retention.*"]

[[plugins.retention.rules]]
name = "events"
table = "events"
column = "created_at"
older_than = "30d"
batch_size = 100
${1:-}
EOF
  chmod 0644 "$ROOT/etc/sweeperd/sweeperd.toml.new"
  mv "$ROOT/etc/sweeperd/sweeperd.toml.new" "$ROOT/etc/sweeperd/sweeperd.toml"
}
SLOW='
[sweeps.slow]
interval = "10s"
operations = ["nap.*"]'
write_config

# -- boot ---------------------------------------------------------------------------------------
note "booting"
must "the root boots with systemd ($(chroot "$ROOT" dpkg-query -W -f '${Version}' systemd))" boot
must "PostgreSQL 15 is up" wait_for 60 inside runuser -u postgres -- pg_isready -q

# The database side, as the README says: a role named like the unit (peer authentication).
inside runuser -u postgres -- createuser sweeperd
inside runuser -u postgres -- createdb -O sweeperd app
for t in a b; do
  psql_app "CREATE SCHEMA tenant_$t AUTHORIZATION sweeperd;
    CREATE TABLE tenant_$t.events (id bigserial PRIMARY KEY, created_at timestamptz NOT NULL);
    CREATE INDEX ON tenant_$t.events (created_at);
    ALTER TABLE tenant_$t.events OWNER TO sweeperd;
    INSERT INTO tenant_$t.events (created_at)
      SELECT now() - interval '60 days' FROM generate_series(1, 250)
      UNION ALL SELECT now() FROM generate_series(1, 50);"
done
inside systemctl daemon-reload

# -- 1. without libnss-systemd: a clear error, at err priority, and no restart loop --------------
if inside sh -c 'ls /lib/*/libnss_systemd.so.2' >/dev/null 2>&1; then
  note "libnss-systemd is already in the root; skipping the 'missing' checks"
else
  mark_journal
  inside systemctl start sweeperd >/dev/null 2>&1 || true
  sleep 7  # longer than RestartSec=5: a restart would have happened
  check "without libnss-systemd: start fails with exit 2" unit_is ExecMainStatus 2
  check "without libnss-systemd: no restart (RestartPreventExitStatus=2)" unit_is NRestarts 0
  check "without libnss-systemd: journalctl -p err says to install it" \
    journal_has 'has no user name.*apt-get install libnss-systemd' 3
  inside systemctl reset-failed sweeperd || true
fi
must "apt-get install libnss-systemd (the README's step)" \
  inside sh -c 'DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-download libnss-systemd >/dev/null 2>&1'

# -- 2. operator commands beside a credential-based unit ---------------------------------------
out=$(inside /opt/sweeperd/bin/sweeperd check-config -c /etc/sweeperd/sweeperd.toml 2>&1 || true)
check "check-config as root outside the unit names dsn_credential and --unit" \
  in_output 'dsn_credential: expected \$CREDENTIALS_DIRECTORY.*sweeperd --unit' "$out"
out=$(inside /opt/sweeperd/bin/sweeperd --unit sweeperd check-config 2>&1 || true)
check "sweeperd --unit sweeperd check-config: $out" in_output ': OK \(' "$out"

# -- 3. start, STATUS, journal, one sweep's effect ----------------------------------------------
mark_journal
must "systemctl enable --now sweeperd" inside systemctl enable --now sweeperd
check "active after start" is_state active
check "STATUS: idle, next firing to the second" \
  wait_for 10 status_matches '^idle; next often [0-9-]+ [0-9]{2}:[0-9]{2}:[0-9]{2} UTC'
check "one sweep deletes the expired rows (and only those)" wait_for 40 rows_are "50 50"
check "STATUS after the sweep: idle with the last result" \
  wait_for 15 status_matches '^idle; next often .*; last often: 2 ok, 0 failed$'
note "STATUS=$(unit_show StatusText)"
check "journal: 'sweeperd ready' at info" journal_has '"event": "sweeperd ready"' 6
check "journal: nothing at warning or worse" journal_quiet_at 4
out=$(inside /opt/sweeperd/bin/sweeperd --unit sweeperd status 2>&1 || true)
check "sweeperd --unit sweeperd status shows the run" in_output '^often \[main\]' "$out"

# -- 4. reload: good, then broken ---------------------------------------------------------------
mark_journal
write_config '
[[tenants]]
name = "c"
database = "main"
schema = "tenant_c"'
check "systemctl reload (good config)" inside systemctl reload sweeperd
check "journal: configuration reloaded" wait_for 10 journal_has 'configuration reloaded'
mark_journal
sed -i 's/^drain_timeout = .*/drain_timeout = "soon"/' "$ROOT/etc/sweeperd/sweeperd.toml"
inside systemctl reload sweeperd || true
check "broken reload: still active" is_state active
check "broken reload: STATUS says so" wait_for 10 status_matches '^reload failed \(1 problem\(s\)\); running the previous configuration'
check "broken reload: the problem at err priority" journal_has 'daemon.drain_timeout' 3
write_config
inside systemctl reload sweeperd

# -- 5. stop: idle; mid-query after the drain; "now" ---------------------------------------------
mark_journal
check "systemctl stop (idle)" inside systemctl stop sweeperd
check "stopped cleanly (exit 0)" unit_is ExecMainStatus 0
check "stopped cleanly (result success)" unit_is Result success

DRAIN=3s write_config "$SLOW"
inside systemctl start sweeperd
must "a long statement is running" wait_for 30 napping
mark_journal
check "systemctl stop mid-query" inside systemctl stop sweeperd
check "mid-query stop: cancelled after the drain" journal_has 'drain timeout expired'
check "mid-query stop: nothing left running on the server" no_naps

DRAIN=600s write_config "$SLOW"
inside systemctl start sweeperd
must "a long statement is running again" wait_for 30 napping
mark_journal
inside systemctl stop --no-block sweeperd
sleep 1
check "while the stop drains (600s): systemctl kill -s SIGQUIT sweeperd" \
  inside systemctl kill -s SIGQUIT sweeperd
check "stop now: inactive well before the drain" wait_for 20 is_state inactive
check "stop now: the journal says why" journal_has 'stop now \(SIGQUIT\)'
check "stop now: nothing left running on the server" no_naps

# -- 6. a config error at start: exit 2, at err priority, no restart loop ------------------------
printf '[daemon]\ndrain_timeout = "soon"\n' >"$ROOT/etc/sweeperd/sweeperd.toml"
mark_journal
inside systemctl start sweeperd >/dev/null 2>&1 || true
sleep 7
check "broken config at start: exit 2" unit_is ExecMainStatus 2
check "broken config at start: not restarted" unit_is NRestarts 0
check "broken config at start: failed" is_state failed
check "broken config at start: journalctl -p err names file and key" \
  journal_has '^sweeperd: /etc/sweeperd/sweeperd.toml: daemon.drain_timeout: ' 3
inside systemctl reset-failed sweeperd || true
write_config

# -- 7. enable + reboot ---------------------------------------------------------------------------
inside systemctl start sweeperd
note "rebooting"
inside systemctl reboot || true
for _ in $(seq 1 300); do kill -0 "$NSPAWN_PID" 2>/dev/null || break; sleep 0.2; done
NSPAWN_PID=
must "the root boots again" boot
check "after reboot: sweeperd is enabled" in_output '^enabled$' "$(inside systemctl is-enabled sweeperd)"
check "after reboot: sweeperd is active" wait_for 30 is_state active
check "after reboot: STATUS is idle with the next firing" wait_for 10 status_matches '^idle; next often '

# -- 8. the unit under systemd-analyze ---------------------------------------------------------
out=$(inside systemd-analyze verify /etc/systemd/system/sweeperd.service 2>&1 || true)
check "systemd-analyze verify: no findings${out:+ ($out)}" test -z "$out"
exposure=$(inside systemd-analyze security sweeperd --no-pager 2>/dev/null | sed -n 's/.*Overall exposure level for sweeperd.service: \([0-9.]*\).*/\1/p')
check "systemd-analyze security: exposure ${exposure:-?} <= 2.0" \
  awk -v e="${exposure:-99}" 'BEGIN { exit !(e <= 2.0) }'

if (( FAILED )); then
  inside journalctl -u sweeperd --no-pager -n 40 -o cat >"$CACHE/sweeperd-journal.txt" 2>&1 || true
fi
finish
