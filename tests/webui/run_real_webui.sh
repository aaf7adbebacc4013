#!/usr/bin/env bash
# Verify the extension in a real AUTOMATIC1111 v1.10.1 (set up by ../shared/a1111/setup.sh).
# usage: tests/webui/run_real_webui.sh [pytest args]     env: A1111_ROOT (/tmp/a1111)
# Links this checkout into extensions/, runs install.py twice (2nd must be silent), starts the WebUI
# (API) and a second one with --api-auth, runs tests/webui/test_real_webui.py, stops both.
set -uo pipefail
ROOT=${A1111_ROOT:-/tmp/a1111}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
WEBUI=$ROOT/webui
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
[ -x "$ROOT/run-webui.sh" ] || { echo "no WebUI at $ROOT (see ../shared/a1111/README.md)"; exit 2; }
ln -sfn "$REPO" "$WEBUI/extensions/sd-webui-perfusion"

echo "== install.py (as the WebUI runs it), twice"
for i in 1 2; do
  start=$(date +%s.%N)
  out=$(cd "$WEBUI" && REQS_FILE=$ROOT/requirements_cpu_py311.txt PYTHONPATH=$WEBUI "$ROOT/venv/bin/python" "$REPO/install.py" 2>&1); rc=$?
  printf 'run %d: rc=%d, %.2f s, output: %s\n' "$i" "$rc" "$(echo "$(date +%s.%N) - $start" | bc)" "${out:-<none>}"
done
"$ROOT/venv/bin/python" -c "import numpy, google.protobuf as p; print('numpy', numpy.__version__, 'protobuf', p.__version__)"

PIDS=()
stop() { for p in "${PIDS[@]}"; do kill -- -"$p" 2>/dev/null; wait "$p" 2>/dev/null; done; }
trap stop EXIT
start_server() {  # port log args...
  local port=$1 log=$2; shift 2
  setsid "$ROOT/run-webui.sh" --nowebui --port "$port" "$@" > "$log" 2>&1 &
  PIDS+=($!)
  for _ in $(seq 1 300); do curl -s -o /dev/null -m 2 "http://127.0.0.1:$port/docs" && return 0; sleep 1; done
  echo "server on $port did not start"; tail -30 "$log"; return 1
}
start_server 7861 "$ROOT/perfusion-verify.log" || exit 1
start_server 7862 "$ROOT/perfusion-verify-auth.log" --api-auth user:pass || exit 1
echo "== extension lines in the console (errors/warnings):"
grep -n -i -E "perfusion" "$ROOT/perfusion-verify.log" | grep -i -E "error|warn|traceback" || echo "none"

cd "$REPO"
PERFUSION_WEBUI_URL=http://127.0.0.1:7861 PERFUSION_WEBUI_LOG=$ROOT/perfusion-verify.log \
PERFUSION_WEBUI_AUTH_URL=http://127.0.0.1:7862 PERFUSION_WEBUI_AUTH=user:pass A1111_ROOT=$ROOT \
  "$REPO/.venv/bin/python" -m pytest -p no:cacheprovider -q -rA tests/webui/test_real_webui.py "$@"
