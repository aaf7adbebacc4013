"""`perfusion serve REPO`: NVIDIA Triton Inference Server on a library repository, stopped cleanly by Ctrl-C.

Where tritonserver comes from, first hit wins:
1. `--triton-home DIR` or `$PERFUSION_TRITON_HOME`, else `.triton/` in this checkout (what `dev/triton.sh`
   installs): the `nvidia-pytriton` wheel unpacked with `pip install --no-deps --target DIR/server`, plus
   `numpy<2` in `DIR/numpy1`. The wheel's bundled libraries go on LD_LIBRARY_PATH, and its Python backend is
   assembled once with the stub built for this Python.
2. A `tritonserver` on PATH with `/opt/tritonserver/backends` (NGC's containers).

The Python-backend models read their import path from `PERFUSION_TRITON_PATH`, which this sets: the
numpy<2 folder first (the stub's BYTES decoding breaks under numpy 2), then this project and this
environment's site-packages.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from pathlib import Path

from perfusion_ext.core.errors import PerfusionError

from .triton_config import PATH_VARIABLE

HOME_VARIABLE = "PERFUSION_TRITON_HOME"
CHECKOUT_HOME = Path(__file__).resolve().parents[3] / ".triton"
SYSTEM_BACKENDS = Path("/opt/tritonserver/backends")
SETUP_HINT = ("install it with `bash dev/triton.sh` (the nvidia-pytriton wheel, no dependencies, into .triton/), "
              "point --triton-home or PERFUSION_TRITON_HOME at such a folder, or run inside an NGC Triton container")


@dataclasses.dataclass(frozen=True)
class TritonInstall:
    binary: Path
    backends: Path
    libraries: Path | None  # the wheel's bundled shared libraries
    numpy1: Path | None  # numpy<2 for the Python-backend stub


def find_install(home: str | os.PathLike | None = None) -> TritonInstall:
    home = Path(home or os.environ.get(HOME_VARIABLE) or CHECKOUT_HOME)
    server = home / "server"
    binary = server / "pytriton" / "tritonserver" / "bin" / "tritonserver"
    if binary.is_file():
        numpy1 = home / "numpy1"
        return TritonInstall(binary, python_backend(server, home / "backends"), server / "nvidia_pytriton.libs",
                             numpy1 if numpy1.is_dir() else None)
    found = shutil.which("tritonserver")
    if found and SYSTEM_BACKENDS.is_dir():
        return TritonInstall(Path(found), SYSTEM_BACKENDS, None, None)
    raise PerfusionError(f"no Triton Inference Server found (looked in {home} and on PATH); {SETUP_HINT}.")


def python_backend(server: Path, backends: Path) -> Path:
    """`backends/python` for this Python: the wheel's backend library with the matching stub beside it."""
    target = backends / "python"
    stub = server / "pytriton" / "tritonserver" / "python_backend_stubs" / f"{sys.version_info.major}." \
        f"{sys.version_info.minor}" / "triton_python_backend_stub"
    if not stub.is_file():
        raise PerfusionError(f"this nvidia-pytriton wheel has no Python backend stub for Python "
                             f"{sys.version_info.major}.{sys.version_info.minor}; {SETUP_HINT}.")
    if not (target / "triton_python_backend_stub").is_file():
        partial = backends / ".python.partial"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(server / "pytriton" / "tritonserver" / "backends" / "python", partial)
        shutil.copy2(stub, partial / "triton_python_backend_stub")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(partial, target)
    return backends


def python_path(install: TritonInstall) -> list[str]:
    """What the Python-backend models import from: numpy<2 first, then this project and this environment."""
    from perfusion_ext.core import errors

    # the folders holding the perfusion_ext and perfusion_export packages
    roots = [str(Path(errors.__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[2])]
    site = [sysconfig.get_paths()[k] for k in ("purelib", "platlib")]
    paths = ([str(install.numpy1)] if install.numpy1 else []) + roots + site
    return list(dict.fromkeys(paths))


@dataclasses.dataclass(frozen=True)
class Ports:
    http: int = 8000
    grpc: int = 8001
    metrics: int = 8002


def command(install: TritonInstall, repository: Path, ports: Ports, models: list[str]) -> list[str]:
    return [str(install.binary), f"--model-repository={repository}", f"--backend-directory={install.backends}",
            f"--http-port={ports.http}", f"--grpc-port={ports.grpc}", f"--metrics-port={ports.metrics}",
            "--model-control-mode=explicit", *[f"--load-model={m}" for m in models],
            "--disable-auto-complete-config",  # the configs are complete; auto-completion starts an extra stub each
            "--backend-config=python,shm-default-byte-size=16777216", "--exit-timeout-secs=30",
            "--log-verbose=0"]


def environment(install: TritonInstall, threads: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if install.libraries is not None:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(install.libraries), env.get("LD_LIBRARY_PATH")]))
    env[PATH_VARIABLE] = os.pathsep.join(python_path(install))
    if threads is not None:
        env.setdefault("OMP_NUM_THREADS", str(threads))
        env["PERFUSION_TRITON_THREADS"] = str(threads)
    return env


def check_repository(repository: Path) -> list[str]:
    from .. import manifest

    info = manifest.read(repository)
    if info.get("layout") != "triton":
        raise PerfusionError(f"{repository} is a {info.get('layout')!r} export; serve a repository written by "
                             "`perfusion export --layout triton`.")
    return ["text_encoder", "unet", "vae_decoder", "pipeline"]


def start(repository, ports: Ports = Ports(), home=None, threads: int | None = None, log=None) -> subprocess.Popen:
    """Start tritonserver on `repository` in the background (its own process group); see `wait_ready`."""
    repository = Path(repository).resolve()
    models = check_repository(repository)
    install = find_install(home)
    return subprocess.Popen(command(install, repository, ports, models), env=environment(install, threads),
                            stdout=log, stderr=subprocess.STDOUT if log is not None else None,
                            start_new_session=True)


def wait_ready(process: subprocess.Popen, url: str, timeout: float = 180.0) -> None:
    """Until `GET /v2/health/ready` answers 200; a server that exits or takes too long is an error."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise PerfusionError(f"tritonserver exited with code {process.returncode} while starting (see its log).")
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise PerfusionError(f"tritonserver was not ready after {timeout:.0f} s.")


def model_statistics(url: str, model: str) -> dict[str, int]:
    """Rows inferred (`inference_count`) and batched executions (`execution_count`) of a model so far."""
    with urllib.request.urlopen(f"{url}/v2/models/{model}/stats", timeout=10) as response:
        stats = json.loads(response.read())["model_stats"][0]
    return {key: int(stats[key]) for key in ("inference_count", "execution_count")}


def stop(process: subprocess.Popen, timeout: float = 30.0) -> int:
    """SIGINT to the server's process group (tritonserver waits for running requests), SIGKILL if it hangs."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode


def interrupted(signum, frame):
    """SIGTERM stops `serve` the way Ctrl-C does."""
    raise KeyboardInterrupt


def serve(repository, ports: Ports = Ports(), home=None, threads: int | None = None) -> int:
    """Run in the foreground until Ctrl-C (or SIGTERM), then stop the server and its Python stubs."""
    process = start(repository, ports, home, threads)
    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        wait_ready(process, f"http://localhost:{ports.http}")
        print(f"serving {repository} on http://localhost:{ports.http} (gRPC {ports.grpc}, metrics {ports.metrics}); "
              "Ctrl-C stops", flush=True)
        return process.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        stop(process)
        signal.signal(signal.SIGTERM, previous)
