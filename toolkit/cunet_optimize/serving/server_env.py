"""The Triton server's own Python environment: a venv, made once and cached by content.

Why a separate environment (docs/SERVING.md): the only pip-installable Triton server is the
binary inside the `nvidia-pytriton` 0.7.0 wheel (Triton 2.51, Python backend only), and that
wheel, `tritonclient` 2.51 (whose wheel carries a working `perf_analyzer`) and the Python
backend's stub all need numpy < 2, while this toolkit's environment runs numpy 2. Installing
them here would downgrade numpy under torch and ONNX Runtime; so they live in a small venv of
their own: the server binary, the stub's interpreter (the config's EXECUTION_ENV_PATH), the
client libraries and perf_analyzer.

The venv is created at its final path (a venv's bin/activate, which the Python backend
sources, names its own folder, so it cannot be built aside and renamed), under a lock, and
sealed last (cache_seal.py): a folder without a valid seal is an interrupted creation and is
made again. $CUNET_TRITON_ENV names an existing environment instead (offline machines).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cunet_optimize.cache_seal import check_seal, seal
from cunet_optimize.errors import CUNetError

ENV_VARIABLE = "CUNET_TRITON_ENV"
TRITON_VERSION = "2.51.0"  # the server inside nvidia-pytriton 0.7.0
RECORD_FILE = "cunet-triton-env.json"
# perf_analyzer (tritonclient 2.51) links libb64.so.0d and libcudart.so.12; the nvidia-pytriton
# wheel carries both under hashed names (auditwheel's), so a folder of links gives them theirs
LINKS_DIR = "cunet-libs"
PERF_ANALYZER_LIBS = {"libb64.so.0d": "libb64-*.so.0d", "libcudart.so.12": "libcudart-*.so.12*"}


def requirements() -> tuple[str, ...]:
    """What the server's venv holds: the server binary, the client and perf_analyzer, and
    the runtime the Python backend's model.py runs the engine with (this environment's ONNX
    Runtime release, so served and in-process outputs come from the same kernels)."""
    import onnxruntime

    return ("nvidia-pytriton==0.7.0", f"tritonclient[http,grpc]=={TRITON_VERSION}",
            f"onnxruntime=={onnxruntime.__version__}", "numpy<2")


@dataclass(frozen=True)
class ServerEnv:
    """Paths inside a ready server environment."""

    root: Path

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    @property
    def site_packages(self) -> Path:  # a venv's, by its layout (asking its Python costs a process)
        found = sorted((self.root / "lib").glob("python3*/site-packages"))
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        return found[-1] if found else self.root / "lib" / version / "site-packages"

    @property
    def triton_home(self) -> Path:  # bin/tritonserver, backends/, caches/
        return self.site_packages / "pytriton" / "tritonserver"

    @property
    def tritonserver(self) -> Path:
        return self.triton_home / "bin" / "tritonserver"

    @property
    def library_path(self) -> str:
        """LD_LIBRARY_PATH for tritonserver and perf_analyzer: the wheel's bundled libraries."""
        site = self.site_packages
        return os.pathsep.join(str(p) for p in (site / "nvidia_pytriton.libs", self.triton_home / "lib",
                                                self.root / LINKS_DIR) if p.is_dir())

    @property
    def perf_analyzer(self) -> Path:
        return self.root / "bin" / "perf_analyzer"  # the tritonclient 2.51 wheel installs it as a script


def _env_key(python_version: str, reqs: tuple[str, ...]) -> str:
    return hashlib.sha256(json.dumps({"python": python_version, "requirements": reqs}).encode()).hexdigest()[:16]


def default_env_dir() -> Path:
    from cunet_optimize.data.default_set import cache_root

    python_version = f"{sys.version_info.major}.{sys.version_info.minor}"
    return cache_root() / "triton-env" / _env_key(python_version, requirements())


def _check_usable(env: ServerEnv, where: str) -> ServerEnv:
    if not env.python.is_file():
        raise CUNetError(f"{where}: no bin/python; point {ENV_VARIABLE} at a venv holding {', '.join(requirements())}")
    probe = ("import numpy, onnxruntime, tritonclient.http, tritonclient.grpc, pytriton; "
             "assert int(numpy.__version__.split('.')[0]) < 2, 'numpy ' + numpy.__version__")
    done = subprocess.run([str(env.python), "-c", probe], capture_output=True, text=True)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        raise CUNetError(f"{where} is not a usable Triton server environment ({last}); it needs "
                         f"{', '.join(requirements())}")
    if not env.tritonserver.is_file():
        raise CUNetError(f"{where}: {env.tritonserver} is missing; reinstall nvidia-pytriton==0.7.0 there")
    return env


def find_server_env() -> ServerEnv | None:
    """The ready environment ($CUNET_TRITON_ENV, or the cached one if sealed), else None; never installs."""
    named = os.environ.get(ENV_VARIABLE)
    if named:
        return _check_usable(ServerEnv(Path(named)), f"{ENV_VARIABLE}={named}")
    root = default_env_dir()
    ok, _ = check_seal(root, [root / RECORD_FILE])
    return ServerEnv(root) if ok else None


def ensure_server_env(echo=print) -> ServerEnv:
    """The server environment, created (pip, needs the package index) on first use."""
    found = find_server_env()
    if found is not None:
        return found
    from cunet_optimize.workdir_lock import workdir_lock

    root = default_env_dir()
    root.parent.mkdir(parents=True, exist_ok=True)
    with workdir_lock(root.parent, "cunet-optimize serve (creating the Triton environment)"):
        ok, why = check_seal(root, [root / RECORD_FILE])
        if ok:  # another process made it while this one waited
            return ServerEnv(root)
        if root.exists():
            echo(f"remaking the Triton environment {root} ({why or 'interrupted creation'})")
            shutil.rmtree(root)
        reqs = requirements()
        echo(f"creating the Triton server environment {root} (once): {' '.join(reqs)}")
        try:
            subprocess.run([_base_python(), "-m", "venv", str(root)], check=True)
            env = ServerEnv(root)
            pip = subprocess.run([str(env.python), "-m", "pip", "install", "--quiet", *reqs],
                                 capture_output=True, text=True)
            if pip.returncode:
                last = (pip.stderr.strip().splitlines() or ["?"])[-1]
                raise CUNetError(f"pip could not install the Triton environment ({last}); on a machine without "
                                 f"the package index, point {ENV_VARIABLE} at a venv holding {' '.join(reqs)}")
            _install_stub(env)
            freeze = subprocess.run([str(env.python), "-m", "pip", "freeze"], check=True, capture_output=True,
                                    text=True).stdout.split()
            (root / RECORD_FILE).write_text(json.dumps({"requirements": reqs, "installed": freeze}, indent=2) + "\n")
            _check_usable(env, str(root))
            seal(root, [root / RECORD_FILE])  # last: an interrupted creation has no seal
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
    return ServerEnv(root)


def _base_python() -> str:
    """The interpreter this venv was made from (a venv of a venv would inherit nothing, but
    naming the base keeps the new one independent of this project's venv)."""
    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    return str(base) if base.is_file() else sys.executable


def _install_stub(env: ServerEnv) -> None:
    """The Python backend looks for triton_python_backend_stub beside libtriton_python.so;
    the wheel keeps one stub per Python version aside (PyTriton copies the right one in)."""
    py = subprocess.run([str(env.python), "-c", "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"],
                        check=True, capture_output=True, text=True).stdout.strip()
    stub = env.triton_home / "python_backend_stubs" / py / "triton_python_backend_stub"
    if not stub.is_file():
        raise CUNetError(f"nvidia-pytriton 0.7.0 has no Python backend stub for Python {py} ({stub})")
    target = env.triton_home / "backends" / "python" / stub.name
    shutil.copy2(stub, target)


def prepare(env: ServerEnv) -> None:
    """What the wheels leave undone, for the cached environment and one named by
    $CUNET_TRITON_ENV alike: the Python backend's stub in place, perf_analyzer's library names."""
    if not (env.triton_home / "backends" / "python" / "triton_python_backend_stub").is_file():
        _install_stub(env)
    links = env.root / LINKS_DIR
    libs = env.site_packages / "nvidia_pytriton.libs"
    for name, pattern in PERF_ANALYZER_LIBS.items():
        found = sorted(libs.glob(pattern))
        if found and not (links / name).exists():
            links.mkdir(exist_ok=True)
            (links / name).symlink_to(found[0])
