#!/usr/bin/env bash
# A throwaway PostgreSQL server on 127.0.0.1 for the MLflow tracking server (tests, a laptop trying the cluster's
# database backend). Not for data you want to keep: `stop` may delete it.
#
#   bash scripts/postgres_local.sh start DIR   # initdb (first time) + start on a free loopback port; prints the URI
#   bash scripts/postgres_local.sh stop DIR    # stops it; DIR can then be removed
#   bash scripts/postgres_local.sh status DIR  # exit 0 while it runs
#   bash scripts/postgres_local.sh bin         # prints the folder of the server binaries; exit 3 without them
#
# `start` creates a role and a database (both PG_DATABASE, password random) and writes into DIR: `uri`
# (postgresql://ROLE:PASSWORD@127.0.0.1:PORT/DATABASE, mode 0600, also the last line printed), `pid` (the
# postmaster's), `port` and `data_dir` (the data folder's path; the server's log, postgres.log, is beside it). Use the URI as MLFLOW_BACKEND_STORE_URI of
# scripts/mlflow_server.sh (it needs psycopg: pip install -e ".[postgres]"). The server listens on
# 127.0.0.1 only (TCP needs the password) and on a Unix socket inside its folder, which only its owner can enter.
#
# Run as root (a container), the server runs as PG_OS_USER, since PostgreSQL refuses to run as root. The data
# folder is DIR/pg when that user can reach it (DIR is chowned to it), else a private folder under /tmp (a
# pytest tmp_path of root is not reachable: /tmp/pytest-of-root is 0700) that `stop` deletes.
#
# Environment (defaults in brackets):
#   PG_BIN [initdb's folder on PATH, else the newest /usr/lib/postgresql/*/bin]: initdb, pg_ctl, postgres, psql
#   PG_PORT [a free port]   PG_DATABASE [mlflow]   PG_OS_USER [postgres; only when run as root]
#   PG_START_TIMEOUT [60] seconds
set -euo pipefail

PG_DATABASE="${PG_DATABASE:-mlflow}"
PG_OS_USER="${PG_OS_USER:-postgres}"
TIMEOUT="${PG_START_TIMEOUT:-60}"

die() { echo "[postgres_local] $*" >&2; exit "${RC:-1}"; }
usage() { echo "usage: $0 start|stop|status DIR | bin" >&2; exit 2; }

find_bin() {  # the folder that holds initdb and pg_ctl (Debian keeps them off PATH, in /usr/lib/postgresql/N/bin)
  local d candidates=()
  if [ -n "${PG_BIN:-}" ]; then
    candidates=("$PG_BIN")
  else
    if command -v initdb >/dev/null 2>&1; then candidates+=("$(dirname "$(readlink -f "$(command -v initdb)")")"); fi
    while IFS= read -r d; do candidates+=("$d"); done < <(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -rV)
    while IFS= read -r d; do candidates+=("$d"); done < <(ls -d /usr/pgsql-*/bin 2>/dev/null | sort -rV)
  fi
  for d in "${candidates[@]}"; do
    if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && [ -x "$d/postgres" ]; then echo "$d"; return 0; fi
  done
  local where="on PATH or in /usr/lib/postgresql/*/bin"
  [ -z "${PG_BIN:-}" ] || where="in PG_BIN=$PG_BIN"
  RC=3 die "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found $where; install them" \
    "(Debian/Ubuntu: apt-get install postgresql) or set PG_BIN to their folder"
}

as_server() {  # run a command as the user the server runs as
  if [ "$(id -u)" -ne 0 ]; then "$@"
  elif command -v runuser >/dev/null 2>&1; then runuser -u "$PG_OS_USER" -- "$@"
  else su "$PG_OS_USER" -s /bin/sh -c "$(printf '%q ' "$@")"
  fi
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

alive() {  # a zombie is not alive: where pid 1 does not reap, a stopped postmaster stays one
  kill -0 "$1" 2>/dev/null && [ "$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1)" != Z ]
}

postmaster_pid() {  # the running postmaster's pid, or nothing
  local pid
  [ -n "${DATA:-}" ] && [ -f "$DATA/postmaster.pid" ] || return 0
  pid="$(head -n 1 "$DATA/postmaster.pid" 2>/dev/null || true)"
  if [ -n "$pid" ] && alive "$pid"; then echo "$pid"; fi
}

psql_admin() {  # SQL as the superuser, over the Unix socket
  as_server "$BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$ROOTDIR" -p "$PORT" -U postgres -d postgres "$@"
}

cmd="${1:-}"
[ "$cmd" = bin ] && { find_bin; exit 0; }
case "$cmd" in start|stop|status) ;; *) usage ;; esac
[ $# -eq 2 ] && [ -n "$2" ] || usage
DIR="$2"
[ -e "$DIR" ] && [ ! -d "$DIR" ] && RC=2 die "$DIR exists and is not a folder"
if [ "$cmd" != start ] && [ ! -d "$DIR" ]; then
  [ "$cmd" = stop ] && { echo "[postgres_local] not running (no folder $DIR)"; exit 0; }
  exit 1
fi
[ "$cmd" != start ] || BIN="$(find_bin)"  # before anything is created
mkdir -p "$DIR" 2>/dev/null || RC=2 die "cannot create the folder $DIR"
DIR="$(cd "$DIR" && pwd)"
ROOTDIR=""; DATA=""
if [ -f "$DIR/data_dir" ]; then DATA="$(cat "$DIR/data_dir")"; ROOTDIR="$(dirname "$DATA")"; fi

case "$cmd" in
  status)
    pid="$(postmaster_pid)"
    [ -n "$pid" ] && { echo "[postgres_local] running (pid $pid): port $(cat "$DIR/port")"; exit 0; }
    echo "[postgres_local] not running"; exit 1
    ;;
  stop)
    pid="$(postmaster_pid)"
    if [ -n "$pid" ]; then
      BIN="$(find_bin)"
      as_server "$BIN/pg_ctl" -D "$DATA" -m fast -w -t "$TIMEOUT" stop >/dev/null 2>&1 || true
      for sig in TERM KILL; do  # pg_ctl could not stop it (or is gone): signal the postmaster itself
        alive "$pid" || break
        kill -"$sig" "$pid" 2>/dev/null || true
        for _ in $(seq 20); do alive "$pid" || break; sleep 0.5; done
      done
      ! alive "$pid" || die "the postmaster (pid $pid) did not stop"
      echo "[postgres_local] stopped (pid $pid)"
    else
      echo "[postgres_local] not running"
    fi
    # a private folder outside DIR (root, DIR unreachable to the server user) is deleted: nothing else knows it
    if [ -n "$ROOTDIR" ] && [ "$ROOTDIR" != "$DIR" ] && [ -f "$ROOTDIR/.postgres_local" ]; then rm -rf "$ROOTDIR"; fi
    rm -f "$DIR/uri" "$DIR/pid" "$DIR/port"
    [ "$ROOTDIR" = "$DIR" ] || rm -f "$DIR/data_dir" "$DIR/postgres.log"
    exit 0
    ;;
esac

# start
pid="$(postmaster_pid)"
if [ -n "$pid" ] && [ -f "$DIR/uri" ]; then
  echo "[postgres_local] already running (pid $pid), port $(cat "$DIR/port")" >&2
  cat "$DIR/uri"; exit 0
fi
if [ -z "$DATA" ]; then
  ROOTDIR="$DIR"
  if [ "$(id -u)" -eq 0 ]; then
    id -u "$PG_OS_USER" >/dev/null 2>&1 || die "running as root needs the system user PG_OS_USER=$PG_OS_USER to" \
      "run the server (Debian's postgresql package creates 'postgres'); PostgreSQL refuses to run as root"
    owner="$(stat -c %u "$DIR")"
    chown "$PG_OS_USER" "$DIR"
    if ! as_server test -w "$DIR" -a -x "$DIR"; then  # a parent folder shuts the server user out
      chown "$owner" "$DIR"
      ROOTDIR="$(mktemp -d /tmp/postgres_local.XXXXXX)"
      chown "$PG_OS_USER" "$ROOTDIR"
    fi
  fi
  # the Unix socket lives in ROOTDIR: its path must fit the 107 bytes of sun_path (".s.PGSQL.NNNNN" included)
  if [ "${#ROOTDIR}" -gt 90 ]; then
    [ "$ROOTDIR" = "$DIR" ] || rm -rf "$ROOTDIR"
    ROOTDIR="$(mktemp -d /tmp/postgres_local.XXXXXX)"
    [ "$(id -u)" -ne 0 ] || chown "$PG_OS_USER" "$ROOTDIR"
  fi
  [ "$ROOTDIR" = "$DIR" ] || as_server touch "$ROOTDIR/.postgres_local"  # marks it as ours to delete
  DATA="$ROOTDIR/pg"
  echo "$DATA" > "$DIR/data_dir"
fi
LOG="$ROOTDIR/postgres.log"
if [ ! -f "$DATA/PG_VERSION" ]; then
  as_server "$BIN/initdb" -D "$DATA" -U postgres -E UTF8 --locale=C --auth-local=trust \
    --auth-host=scram-sha-256 >"$ROOTDIR/initdb.log" 2>&1 || { cat "$ROOTDIR/initdb.log" >&2; die "initdb failed"; }
fi

started=""
for attempt in 1 2 3; do  # a free port can be taken before the server binds it: try another
  PORT="${PG_PORT:-$(free_port)}"
  if as_server "$BIN/pg_ctl" -D "$DATA" -l "$LOG" -w -t "$TIMEOUT" -o "-c listen_addresses=127.0.0.1 -p $PORT \
-c unix_socket_directories='$ROOTDIR' -c unix_socket_permissions=0700" start >/dev/null 2>&1; then
    started=1; break
  fi
  [ -n "${PG_PORT:-}" ] && break
  echo "[postgres_local] start on port $PORT failed (attempt $attempt)" >&2
done
if [ -z "$started" ]; then
  tail -n 20 "$LOG" >&2 2>/dev/null || true
  die "the server did not start (log: $LOG)"
fi

PASSWORD="$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
# the password goes through stdin, not the command line (which `ps` shows)
role=$(psql_admin -tA -c "SELECT 1 FROM pg_roles WHERE rolname = '$PG_DATABASE'")
if [ "$role" = 1 ]; then verb=ALTER; else verb=CREATE; fi
psql_admin <<<"$verb ROLE \"$PG_DATABASE\" LOGIN PASSWORD '$PASSWORD'"
if [ "$(psql_admin -tA -c "SELECT 1 FROM pg_database WHERE datname = '$PG_DATABASE'")" != 1 ]; then
  psql_admin -c "CREATE DATABASE \"$PG_DATABASE\" OWNER \"$PG_DATABASE\""
fi

URI="postgresql://$PG_DATABASE:$PASSWORD@127.0.0.1:$PORT/$PG_DATABASE"
(umask 077 && echo "$URI" > "$DIR/uri")
echo "$PORT" > "$DIR/port"
postmaster_pid > "$DIR/pid"
echo "[postgres_local] running (pid $(cat "$DIR/pid")) on 127.0.0.1:$PORT, data $DATA, log $LOG" >&2
echo "$URI"
