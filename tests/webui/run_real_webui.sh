#!/usr/bin/env bash
# Verify the extension in a real AUTOMATIC1111 v1.10.1 (the setup it expects: tests/webui/README.md).
# usage: tests/webui/run_real_webui.sh [pytest args]     env: A1111_ROOT (/tmp/a1111)
# Links this checkout into extensions/, runs install.py twice (2nd must be silent), then one server at a
# time: the WebUI (UI + API when the playwright venv of A1111_UI_TEST=1 exists, else API only) for
# tests/webui/test_real_webui.py and, in UI mode, tests/webui/test_real_webui_ui.py (headless chromium);
# then a second one with --api-auth for the auth test. Stops each server before the next.
set -uo pipefail
ROOT=${A1111_ROOT:-/tmp/a1111}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
WEBUI=$ROOT/webui
UIPY=$ROOT/uitest-venv/bin/python
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE
[ -x "$ROOT/run-webui.sh" ] || { echo "no WebUI at $ROOT (see tests/webui/README.md)"; exit 2; }
ln -sfn "$REPO" "$WEBUI/extensions/sd-webui-perfusion"

echo "== install.py (as the WebUI runs it), twice"
for i in 1 2; do
  start=$(date +%s.%N)
  out=$(cd "$WEBUI" && REQS_FILE=$ROOT/requirements_cpu_py311.txt PYTHONPATH=$WEBUI "$ROOT/venv/bin/python" "$REPO/install.py" 2>&1); rc=$?
  printf 'run %d: rc=%d, %.2f s, output: %s\n' "$i" "$rc" "$(echo "$(date +%s.%N) - $start" | bc)" "${out:-<none>}"
done
"$ROOT/venv/bin/python" -c "import numpy, google.protobuf as p; print('numpy', numpy.__version__, 'protobuf', p.__version__)"

UI=0
if [ "${PERFUSION_NO_UI:-0}" != 1 ] && [ -x "$UIPY" ] && "$UIPY" -c "import playwright, pytest" 2>/dev/null \
   && [ -x "${PERFUSION_CHROMIUM:-/usr/bin/chromium}" ]; then UI=1; fi

PID=
stop() { [ -n "$PID" ] && { kill -- -"$PID" 2>/dev/null; wait "$PID" 2>/dev/null; }; PID=; }
trap stop EXIT
start_server() {  # port log ui(0/1) args...
  local port=$1 log=$2 ui=$3; shift 3
  if [ "$ui" = 1 ]; then setsid "$ROOT/run-webui.sh" --port "$port" "$@" > "$log" 2>&1 &
  else setsid "$ROOT/run-webui.sh" --nowebui --port "$port" "$@" > "$log" 2>&1 & fi
  PID=$!
  for _ in $(seq 1 300); do
    if [ "$ui" = 1 ]; then grep -q "Startup time:" "$log" && return 0  # a request earlier kills a UI server
    else curl -s -o /dev/null -m 2 "http://127.0.0.1:$port/docs" && return 0; fi
    kill -0 "$PID" 2>/dev/null || break
    sleep 1
  done
  echo "server on $port did not start"; tail -30 "$log"; return 1
}
PORT=7861; [ "$UI" = 1 ] && PORT=7860
echo "== WebUI on $PORT ($([ "$UI" = 1 ] && echo "UI + API" || echo "API only"))"
start_server "$PORT" "$ROOT/perfusion-verify.log" "$UI" || exit 1
echo "== extension lines in the console (errors/warnings):"
grep -n -i -E "perfusion" "$ROOT/perfusion-verify.log" | grep -i -E "error|warn|traceback" || echo "none"

cd "$REPO"
rc=0
PERFUSION_WEBUI_URL=http://127.0.0.1:$PORT PERFUSION_WEBUI_LOG=$ROOT/perfusion-verify.log A1111_ROOT=$ROOT \
  "$REPO/.venv/bin/python" -m pytest -p no:cacheprovider -q -rA tests/webui/test_real_webui.py "$@" || rc=1
if [ "$UI" = 1 ]; then
  PERFUSION_WEBUI_UI_URL=http://127.0.0.1:$PORT PERFUSION_WEBUI_LOG=$ROOT/perfusion-verify.log A1111_ROOT=$ROOT \
    "$UIPY" -m pytest -p no:cacheprovider --noconftest -q -rA -s tests/webui/test_real_webui_ui.py || rc=1
else
  echo "== UI checks skipped: no playwright venv at $ROOT/uitest-venv (A1111_UI_TEST=1 setup; pip install pytest there)"
fi
stop

echo "== WebUI with --api-auth on 7862"
start_server 7862 "$ROOT/perfusion-verify-auth.log" 0 --api-auth user:pass || exit 1
PERFUSION_WEBUI_URL=http://127.0.0.1:7862 PERFUSION_WEBUI_AUTH_URL=http://127.0.0.1:7862 PERFUSION_WEBUI_AUTH=user:pass \
  "$REPO/.venv/bin/python" -m pytest -p no:cacheprovider -q -rA tests/webui/test_real_webui.py -k api_auth || rc=1
stop
exit $rc
