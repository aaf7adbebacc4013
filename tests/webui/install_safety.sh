#!/usr/bin/env bash
# install.py in the real WebUI: remove the one package the extension installs, let A1111 run every
# extension's install.py (prepare_environment, then --exit), and compare `pip freeze` before and after.
# A second launch must install nothing. Expects the layout described in tests/webui/README.md.
set -euo pipefail
A1111_ROOT="${A1111_ROOT:-/tmp/a1111}"
PY="$A1111_ROOT/venv/bin/python"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
launch() { A1111_PREPARE_ENV=1 bash "$A1111_ROOT/run-webui.sh" --exit > "$WORK/$1.log" 2>&1; }
freeze() { "$PY" -m pip freeze --all --disable-pip-version-check | sort; }

"$PY" -m pip uninstall -y -q perfusion-pytorch || true
freeze > "$WORK/before"
launch first
freeze > "$WORK/after"
launch second
freeze > "$WORK/again"

REMOVED="$(comm -23 "$WORK/before" "$WORK/after")"
ADDED="$(comm -13 "$WORK/before" "$WORK/after")"
echo "removed or changed: ${REMOVED:-none}"
echo "added: ${ADDED:-none}"
[ -z "$REMOVED" ] || { echo "FAIL: install.py changed packages the WebUI had"; exit 1; }
[ "$ADDED" = "perfusion-pytorch==0.1.23" ] || { echo "FAIL: install.py added more than its own package"; exit 1; }
grep -q "Installing perfusion-pytorch" "$WORK/first.log" || { echo "FAIL: the first launch did not install"; exit 1; }
! grep -q "Installing perfusion-pytorch" "$WORK/second.log" || { echo "FAIL: the second launch called pip"; exit 1; }
cmp -s "$WORK/after" "$WORK/again" || { echo "FAIL: the second launch changed packages"; exit 1; }
echo "OK: $(wc -l < "$WORK/before") packages before, torch $(grep '^torch==' "$WORK/after" | cut -d= -f3) untouched"
