#!/usr/bin/env bash
# make demo: from a fresh clone to a finished qat/demo run, all offline, on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
# The local stack's settings (PREFECT_API_URL, PREFECT_HOME, VAST_URL, STACK_DIR, PATH with .venv/bin).
eval "$(.venv/bin/python -m devtools.stack env)"
python -m devtools.stack up
echo "==> registering deployments (prefect.yaml)"
prefect --no-prompt deploy --all >"$STACK_DIR/logs/deploy.log" 2>&1 || { cat "$STACK_DIR/logs/deploy.log"; exit 1; }
echo "==> running qat/demo; dashboard: $PREFECT_UI_URL"
prefect deployment run qat/demo --watch
echo
echo "Dashboard:  $PREFECT_UI_URL  (Runs -> the qat/demo run -> Artifacts)"
echo "Run report: report/report.md in the newest run folder under $QAT_RUNS_DIR/demo/"
echo "Stop the local stack with: make stop"
