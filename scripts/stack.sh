#!/usr/bin/env bash
# The local stack for the demo: a Prefect server (state in .prefect/), the Vast.ai emulator (state
# in .stack/emulator/) and a process worker. `up` reuses whatever is already running.
#   scripts/stack.sh up | down | status
set -euo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"
mkdir -p "$STACK_DIR/logs" "$PREFECT_HOME"
DEMO_VAST_KEY_FILE="$STACK_DIR/emulator-api-key"

alive() { [ -f "$STACK_DIR/$1.pid" ] && kill -0 "$(cat "$STACK_DIR/$1.pid")" 2>/dev/null; }

start() {  # name, command...
  local name=$1; shift
  if alive "$name"; then echo "    $name already running (pid $(cat "$STACK_DIR/$name.pid"))"; return; fi
  nohup setsid "$@" >"$STACK_DIR/logs/$name.log" 2>&1 &
  echo $! >"$STACK_DIR/$name.pid"
  echo "    $name started (pid $!, log .stack/logs/$name.log)"
}

wait_http() {  # url, what, seconds
  for _ in $(seq 1 "$3"); do
    python - "$1" <<'PY' && return 0
import sys, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=2)
except urllib.error.HTTPError:
    pass  # it answers: good enough
except Exception:
    sys.exit(1)
PY
    sleep 1
  done
  echo "$2 did not come up at $1; see .stack/logs/" >&2; exit 1
}

up() {
  echo "==> Prefect server ($PREFECT_UI_URL)"
  start prefect-server prefect server start --host 127.0.0.1 --port "$PREFECT_SERVER_API_PORT"
  wait_http "$PREFECT_API_URL/health" "the Prefect server" 120
  echo "==> Vast.ai emulator ($VAST_URL)"
  [ -f "$DEMO_VAST_KEY_FILE" ] || python -c "import secrets; print('emu-' + secrets.token_hex(16))" >"$DEMO_VAST_KEY_FILE"
  chmod 600 "$DEMO_VAST_KEY_FILE"
  start emulator python -m infra.emulator --port "$EMULATOR_PORT" --state-dir "$STACK_DIR/emulator" \
    --api-key "$(cat "$DEMO_VAST_KEY_FILE")"
  wait_http "$VAST_URL/api/v0/users/current" "the Vast.ai emulator" 60
  echo "==> Prefect blocks, work pool, concurrency limit"
  python - <<'PY'
import os
from prefect.blocks.system import Secret
Secret(value=open(os.environ["STACK_DIR"] + "/emulator-api-key").read().strip()).save("vast-api-key", overwrite=True)
PY
  prefect work-pool inspect qat-pool >/dev/null 2>&1 || prefect work-pool create qat-pool --type process >/dev/null
  prefect gcl inspect vast-gpus >/dev/null 2>&1 || prefect gcl create vast-gpus --limit 1 >/dev/null
  echo "==> worker"
  start worker prefect worker start --pool qat-pool
}

down() {
  for name in worker emulator prefect-server; do
    if alive "$name"; then
      kill -- "-$(cat "$STACK_DIR/$name.pid")" 2>/dev/null || kill "$(cat "$STACK_DIR/$name.pid")" 2>/dev/null || true
      echo "    $name stopped"
    fi
    rm -f "$STACK_DIR/$name.pid"
  done
}

status() {
  for name in prefect-server emulator worker; do
    if alive "$name"; then echo "$name: running (pid $(cat "$STACK_DIR/$name.pid"))"; else echo "$name: stopped"; fi
  done
}

"${1:-status}"
