#!/usr/bin/env bash
# Start an MLflow tracking server (UI + REST API) for multi-node sweeps.
#
#   bash scripts/mlflow_server.sh            # foreground (Ctrl+C stops it)
#   bash scripts/mlflow_server.sh start      # background: pid/log/url files in $MLFLOW_DIR, waits for /health
#   bash scripts/mlflow_server.sh stop       # stops the server `start` launched (by its pid file)
#
# It binds 127.0.0.1 unless MLFLOW_HOST says otherwise. On a cluster, set MLFLOW_HOST to the head's private
# IP (clusters/*.yaml do), never 0.0.0.0 on a machine with a public interface: the server has no login.
# The backend store is sqlite on this machine's disk (sqlite must not live on NFS: its locks are unreliable
# there); artifacts go to MLFLOW_ARTIFACTS_DESTINATION (a local dir, a shared mount, or s3://bucket/prefix
# with boto3 installed and credentials from an IAM role) and are proxied by the server, so trials only need
# HTTP access to it. On a cluster the backend store is a PostgreSQL database instead (clusters/*.yaml):
#   MLFLOW_BACKEND_STORE_URI=postgresql://USER:PASSWORD@HOST:5432/mlflow
# needs the psycopg (3) driver where the server runs (pip install -e ".[postgres]"): a bare postgresql:// is
# given to MLflow as postgresql+psycopg://, since SQLAlchemy picks a bare one's driver by its own version (2.0:
# psycopg2, 2.1: psycopg). The server creates or migrates MLflow's tables on its first start.
# scripts/postgres_local.sh starts a throwaway PostgreSQL on 127.0.0.1 and prints such a URI. Printed URIs hide
# the password.
#
# Environment (defaults in brackets):
#   MLFLOW_HOST [127.0.0.1]   MLFLOW_PORT [5000]   MLFLOW_WORKERS [2]
#   MLFLOW_DIR [<repo>/runs/mlflow-server]: holds mlflow.db, artifacts/, mlflow.pid, mlflow.log, url
#   MLFLOW_BACKEND_STORE_URI [sqlite:///$MLFLOW_DIR/mlflow.db]
#   MLFLOW_ARTIFACTS_DESTINATION [$MLFLOW_DIR/artifacts]
#   MLFLOW_ALLOWED_HOSTS [MLflow's default: localhost and private IPs]: Host headers the server accepts
#   MLFLOW [mlflow on PATH, else <repo>/.venv/bin/mlflow]   MLFLOW_START_TIMEOUT [60] seconds
#   MLFLOW_DISABLE_TELEMETRY [true]: MLflow 3 reports usage to mlflow-telemetry.io unless this is set
set -euo pipefail
export MLFLOW_DISABLE_TELEMETRY="${MLFLOW_DISABLE_TELEMETRY:-true}"

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
MLFLOW_HOST="${MLFLOW_HOST:-127.0.0.1}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
MLFLOW_WORKERS="${MLFLOW_WORKERS:-2}"
MLFLOW_DIR="${MLFLOW_DIR:-$ROOT/runs/mlflow-server}"
mkdir -p "$MLFLOW_DIR"
MLFLOW_DIR="$(cd "$MLFLOW_DIR" && pwd)"  # absolute: sqlite:/// needs it, and trials run elsewhere
BACKEND="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$MLFLOW_DIR/mlflow.db}"
case "$BACKEND" in postgresql://*) BACKEND="postgresql+psycopg://${BACKEND#postgresql://}" ;; esac  # the driver
ARTIFACTS="${MLFLOW_ARTIFACTS_DESTINATION:-$MLFLOW_DIR/artifacts}"
SHOWN="$(printf '%s' "$BACKEND" | sed -E 's#^([a-z0-9+]+://[^:/@]*):[^@/]*@#\1:***@#')"  # for messages: no password
# A PostgreSQL password in the URI goes to the server through PGPASSWORD (libpq reads it), not its command line,
# where `ps` would show it to every user of the machine. (Percent-encoded passwords: use a PGPASSFILE instead.)
case "$BACKEND" in
  postgresql*://*:*@*)
    export PGPASSWORD="$(printf '%s' "$BACKEND" | sed -E 's#^[a-z0-9+]+://[^:/@]*:([^@/]*)@.*#\1#')"
    BACKEND="$(printf '%s' "$BACKEND" | sed -E 's#^([a-z0-9+]+://[^:/@]*):[^@/]*@#\1@#')" ;;
esac
PIDFILE="$MLFLOW_DIR/mlflow.pid"
if [ -z "${MLFLOW:-}" ]; then
  if command -v mlflow >/dev/null 2>&1; then MLFLOW=mlflow; else MLFLOW="$ROOT/.venv/bin/mlflow"; fi
fi
URL="http://$MLFLOW_HOST:$MLFLOW_PORT"
case "$MLFLOW_HOST" in *:*) URL="http://[$MLFLOW_HOST]:$MLFLOW_PORT" ;; esac

server_cmd() {
  case "$ARTIFACTS" in *://*) ;; *) mkdir -p "$ARTIFACTS" ;; esac
  local cmd=("$MLFLOW" server --backend-store-uri "$BACKEND" --artifacts-destination "$ARTIFACTS"
             --host "$MLFLOW_HOST" --port "$MLFLOW_PORT" --workers "$MLFLOW_WORKERS")
  if [ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]; then cmd+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS"); fi
  printf '%q ' "${cmd[@]}"
}

wait_healthy() {  # $1 = pid of the server; fails if it dies or does not answer in time
  local deadline=$((SECONDS + ${MLFLOW_START_TIMEOUT:-60}))
  while [ "$SECONDS" -lt "$deadline" ]; do
    if ! kill -0 "$1" 2>/dev/null; then
      echo "[mlflow_server] the server exited; last log lines:" >&2
      tail -n 20 "$MLFLOW_DIR/mlflow.log" >&2
      return 1
    fi
    if python3 -c "import urllib.request,sys; urllib.request.urlopen(sys.argv[1], timeout=2)" \
        "$URL/health" 2>/dev/null; then
      return 0
    fi
    sleep 1
  done
  echo "[mlflow_server] no answer from $URL/health within ${MLFLOW_START_TIMEOUT:-60}s" >&2
  return 1
}

case "${1:-run}" in
  run)
    echo "[mlflow_server] $URL (backend $SHOWN, artifacts $ARTIFACTS)"
    eval "exec $(server_cmd)"
    ;;
  start)
    if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
      echo "[mlflow_server] already running (pid $(cat "$PIDFILE")): $(cat "$MLFLOW_DIR/url")"
      exit 0
    fi
    # setsid: the server survives the shell (and the `docker exec`/ssh session) that started it.
    eval "setsid nohup $(server_cmd) > \"\$MLFLOW_DIR/mlflow.log\" 2>&1 < /dev/null &"
    echo $! > "$PIDFILE"
    wait_healthy "$(cat "$PIDFILE")"
    echo "$URL" > "$MLFLOW_DIR/url"
    echo "[mlflow_server] running (pid $(cat "$PIDFILE")): $URL  backend $SHOWN  artifacts $ARTIFACTS"
    ;;
  stop)
    if [ -f "$PIDFILE" ] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
      pid="$(cat "$PIDFILE")"
      kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid"  # the whole session: uvicorn workers too
      for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      echo "[mlflow_server] stopped (pid $pid)"
    else
      echo "[mlflow_server] not running"
    fi
    rm -f "$PIDFILE" "$MLFLOW_DIR/url"
    ;;
  *)
    echo "usage: $0 [run|start|stop]" >&2
    exit 2
    ;;
esac
