"""install.py in a WebUI-like venv leaves torch and every WebUI pin untouched.

The venv holds a pinned torch (the CPU wheel) and two of the pins a stock A1111 1.10 makes (numpy 1.26.2,
protobuf 3.20.0). install.py runs the way A1111's `run_extension_installer` runs it: a child process with the
WebUI folder on PYTHONPATH, whose `launch.run_pip` shells out to `"{python}" -m pip {command} --prefer-binary`.
`pip freeze` before and after must differ by exactly the one package the extension installs, and a second
launch must not call pip at all.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WEBUI_PINS = ("torch==2.13.0", "numpy==1.26.2", "protobuf==3.20.0")

# The two functions of A1111 1.10's modules/launch_utils.py that install.py reaches, with the same command line.
FAKE_LAUNCH = textwrap.dedent('''
    import subprocess, sys
    python = sys.executable
    calls = []

    def run_pip(command, desc=None, live=False):
        calls.append(command)
        print(f"Installing {desc}")
        with open(__file__ + ".calls", "a") as log:
            log.write(command + "\\n")
        result = subprocess.run(f'"{python}" -m pip {command} --prefer-binary', shell=True,
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"Couldn't install {desc}: {result.stderr}")
        return result.stdout
''')


def _freeze(python: Path) -> set[str]:
    out = subprocess.run([str(python), "-m", "pip", "freeze", "--all", "--disable-pip-version-check"],
                         check=True, capture_output=True, text=True).stdout
    return {line.strip() for line in out.splitlines() if line.strip()}


def _run_installer(python: Path, webui: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(webui))
    env.pop("VIRTUAL_ENV", None)
    return subprocess.run([str(python), str(ROOT / "install.py")], env=env, cwd=webui,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_install_py_changes_nothing_the_webui_pins(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                    *WEBUI_PINS], check=True, capture_output=True, text=True)
    webui = tmp_path / "webui"
    webui.mkdir()
    (webui / "launch.py").write_text(FAKE_LAUNCH)

    before = _freeze(python)
    assert any(line.startswith("torch==2.13.0") for line in before), before
    first = _run_installer(python, webui)
    assert first.returncode == 0, first.stderr
    after = _freeze(python)

    calls = (webui / "launch.py.calls").read_text().splitlines()
    assert calls and all("--no-deps" in call for call in calls), calls
    assert before - after == set(), f"install.py removed or changed: {sorted(before - after)}"
    added = {line.split("==")[0].lower() for line in after - before}
    assert added == {"perfusion-pytorch"}, f"install.py added more than its own package: {sorted(after - before)}"

    second = _run_installer(python, webui)
    assert second.returncode == 0, second.stderr
    assert "Installing" not in second.stdout, "a second launch called pip although nothing was missing"
    assert (webui / "launch.py.calls").read_text().splitlines() == calls
    assert _freeze(python) == after
