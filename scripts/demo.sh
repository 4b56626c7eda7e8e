#!/usr/bin/env bash
# make demo: from a fresh clone to a finished qat/demo run, all offline, on this machine.
# The demo stays apart from real use: its own work pools (qat-demo, qat-demo-reaper), Secret block
# (vast-emulator-api-key) and endpoint (the emulator), set on the demo deployments in prefect.yaml;
# it registers only those deployments and never touches vast-api-key or qat-pool.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
# The local stack's settings (PREFECT_API_URL, PREFECT_HOME, STACK_DIR, PATH with .venv/bin); no Vast.ai endpoint or key.
eval "$(.venv/bin/python -m devtools.stack env)"
python -m devtools.stack up
echo "==> registering the demo deployments (prefect.yaml: qat/demo, reap/demo)"
prefect --no-prompt deploy --name qat/demo --name reap/demo >"$STACK_DIR/logs/deploy.log" 2>&1 \
  || { cat "$STACK_DIR/logs/deploy.log"; exit 1; }
echo "==> running qat/demo; dashboard: $PREFECT_UI_URL"
prefect deployment run qat/demo --watch
echo
echo "Dashboard:  $PREFECT_UI_URL  (Runs -> the qat/demo run -> Artifacts)"
echo "Run report: report/report.md in the newest run folder under $QAT_RUNS_DIR/demo/"
echo "Stop the local stack with: make stop"
