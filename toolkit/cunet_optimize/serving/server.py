"""A real Triton Inference Server on this machine, serving CPU builds (`cunet-optimize serve`).

What serves a CPU engine, and how: the pip-installable Triton (serving/server_env.py) has the
Python backend only, so `serve` assembles a temporary repository in which each build is a model
named after its folder whose config is the build's own (same tensors, batching, instances:
serving/triton_config.py) with `backend: "python"`, and whose 1/model.py
(serving/triton_model.py) runs the build's model.ort.onnx with its session.json settings in
ONNX Runtime, in the server environment (EXECUTION_ENV_PATH). The repositories a build emits
stay the standard ones (deploy/triton: onnxruntime backend, tensorrt_plan); a full Triton
serves those as they are.

The server runs in its own session (Ctrl-C reaches this process, which stops it with SIGINT,
Triton's own clean shutdown), on 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cunet_optimize.errors import CUNetError
from cunet_optimize.serving.model_io import ModelIO, read_model_io
from cunet_optimize.serving.server_env import ServerEnv, prepare
from cunet_optimize.serving.triton_config import CONFIG_FILE, VERSION, render_config, served_by_python_backend, triton_model

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 60
EXIT_TIMEOUT_S = 5
STOP_TIMEOUT_S = 20  # after SIGINT, before SIGKILL: Triton's exit timeout and its models' unloading
# Files run by the server environment's Python, never imported here (they import its packages)
PYTHON_MODEL = Path(__file__).with_name("triton_model.py")
KSERVE_CLIENT = Path(__file__).with_name("kserve_client.py")


@dataclass(frozen=True)
class ServedBuild:
    name: str  # the model's name: the build folder's
    build_dir: Path
    io: ModelIO


def check_servable(build_dir: str | os.PathLike) -> tuple[ServedBuild, dict]:
    """A CPU build whose files are as it wrote them, as (ServedBuild, build.json); CUNetError otherwise."""
    from cunet_optimize.manifests.build import BUILD_FILE, artifact_hash_problems, read_build_manifest

    path = Path(build_dir)
    if not (path / BUILD_FILE).is_file():
        raise CUNetError(f"{build_dir}: not a build folder (no {BUILD_FILE}); give folders under WORKDIR/engines/")
    manifest = read_build_manifest(path / BUILD_FILE)
    problems = artifact_hash_problems(manifest, path)
    if problems:
        rel, what = problems[0]
        raise CUNetError(f"{path / rel} {what}; rebuild it (`cunet-optimize build ... --force`)")
    if manifest.backend == "tensorrt" or not manifest.engine_built:
        raise CUNetError(f"{build_dir}: a {manifest.target} build ({manifest.backend}); this machine's Triton has the "
                         "Python backend only, which serves CPU engines: serve its deploy/triton with a Triton "
                         "that has the TensorRT backend (NGC tritonserver) on the device")
    # A cpu build keeps its ONNX Runtime engine (session.json) beside an OpenVINO choice: that is what
    # the Python backend here runs. bf16 runs on OpenVINO alone.
    if "session" not in manifest.artifacts:
        raise CUNetError(f"{build_dir}: a {manifest.precision} cpu build without an ONNX Runtime engine (it runs on "
                         "OpenVINO only); this machine's Triton serves ONNX Runtime engines: serve its deploy/triton "
                         "with a Triton that has the OpenVINO backend, or build fp32 or int8 to serve it here")
    if manifest.backend != "onnxruntime":
        log.warning("%s chose %s on this machine; Triton here serves its ONNX Runtime engine (the Python backend "
                    "has no %s)", path.name, manifest.backend, manifest.backend)
    raw = json.loads((path / BUILD_FILE).read_text())
    return ServedBuild(path.resolve().name, path.resolve(), read_model_io(path / "model.onnx")), raw


def write_served_repository(builds: list[tuple[ServedBuild, dict]], env: ServerEnv, repo: Path) -> None:
    """repo/<name>/config.pbtxt + 1/model.py for each build (see the module's docstring)."""
    for build, manifest in builds:
        spec = manifest.get("target_spec") or {}
        model = triton_model(build.name, build.io, "onnxruntime", tuple(spec.get("batch") or (1, 1, 8)),
                             manifest.get("engine_settings"))
        served = served_by_python_backend(model, {"build_dir": str(build.build_dir),
                                                  "EXECUTION_ENV_PATH": str(env.root)})
        (repo / build.name / VERSION).mkdir(parents=True)
        (repo / build.name / CONFIG_FILE).write_text(render_config(served))
        shutil.copyfile(PYTHON_MODEL, repo / build.name / VERSION / "model.py")


@dataclass
class TritonServer:
    """tritonserver over `repositories`, as a context manager: started and ready on entry,
    stopped (SIGINT, then SIGKILL after STOP_TIMEOUT_S) on exit."""

    env: ServerEnv
    repositories: list[Path]
    load: list[str] | None = None  # models to load at start (None: none; load them over HTTP)
    address: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    log_path: Path | None = None
    process: subprocess.Popen | None = field(default=None, init=False)

    @property
    def http_url(self) -> str:
        return f"http://{self.address}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.address}:{self.grpc_port}"

    def argv(self) -> list[str]:
        home = self.env.triton_home
        argv = [str(self.env.tritonserver), *(f"--model-repository={r}" for r in self.repositories),
                f"--backend-directory={home / 'backends'}", f"--cache-directory={home / 'caches'}",
                "--model-control-mode=explicit", "--disable-auto-complete-config",
                "--allow-gpu-metrics=false", "--strict-readiness=true",
                # Ctrl-C: stop waiting for in-flight requests after a few seconds (Triton's default is 30,
                # which with STOP_TIMEOUT_S let a loaded machine take a minute to stop)
                f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
                f"--http-address={self.address}", f"--http-port={self.http_port}",
                f"--grpc-address={self.address}", f"--grpc-port={self.grpc_port}",
                f"--metrics-address={self.address}", f"--metrics-port={self.metrics_port}"]
        return argv + [f"--load-model={name}" for name in self.load or []]

    def __enter__(self) -> "TritonServer":
        prepare(self.env)
        environ = dict(os.environ)
        environ["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (self.env.library_path,
                                                                 environ.get("LD_LIBRARY_PATH")) if p)
        environ["PATH"] = f"{self.env.root / 'bin'}{os.pathsep}{environ.get('PATH', '')}"  # the stub's Python
        log = open(self.log_path, "wb") if self.log_path else subprocess.DEVNULL
        try:
            self.process = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT, env=environ,
                                            start_new_session=True)  # Ctrl-C is ours to forward
        finally:
            if log is not subprocess.DEVNULL:
                log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _log_tail(self, lines: int = 5) -> str:
        if not self.log_path or not self.log_path.is_file():
            return ""
        text = self.log_path.read_text(errors="replace").strip().splitlines()
        return " | ".join(line.strip() for line in text[-lines:] if "CudaDriverHelper" not in line)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise CUNetError(f"tritonserver exited with status {self.process.returncode} at start "
                                 f"(ports {self.http_port}/{self.grpc_port}/{self.metrics_port} taken?): "
                                 f"{self._log_tail()}")
            if self.get("/v2/health/ready", quiet=True) is not None:
                return
            time.sleep(0.2)
        raise CUNetError(f"tritonserver not ready after {READY_TIMEOUT_S} s: {self._log_tail()}")

    def stop(self) -> int | None:
        """SIGINT (Triton unloads its models and exits), SIGKILL if it hangs; its exit status."""
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGINT)
        try:
            return self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    # KServe v2 over HTTP: JSON endpoints, with urllib (no client library needed here)
    def get(self, route: str, quiet: bool = False):
        try:
            with urllib.request.urlopen(self.http_url + route, timeout=5) as r:
                body = r.read()
                return json.loads(body) if body else {}
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if quiet:
                return None
            raise

    def post(self, route: str, body: dict | None = None) -> tuple[int, dict]:
        request = urllib.request.Request(self.http_url + route, data=json.dumps(body or {}).encode(), method="POST")
        try:
            with urllib.request.urlopen(request, timeout=120) as r:
                text = r.read()
                return r.status, json.loads(text) if text else {}
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")

    def load_model(self, name: str) -> str | None:
        """Ask the server to load `name`; None when loaded, else its error message."""
        status, body = self.post(f"/v2/repository/models/{name}/load")
        return None if status == 200 else body.get("error", f"HTTP {status}")

    def stats(self, name: str) -> dict:
        return self.get(f"/v2/models/{name}/stats")["model_stats"][0]

    def metrics(self) -> str:
        url = f"http://{self.address}:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.read().decode()

    def infer(self, protocol: str, build: ServedBuild, images: np.ndarray) -> dict[str, np.ndarray]:
        """One request over `protocol` (http | grpc) through tritonclient in the server's environment."""
        url = self.http_url.removeprefix("http://") if protocol == "http" else self.grpc_url
        with tempfile.TemporaryDirectory(prefix="cunet-kserve-") as tmp:
            np.save(Path(tmp) / "in.npy", images.astype(np.float32))
            done = subprocess.run([str(self.env.python), str(KSERVE_CLIENT), url, protocol, build.name,
                                   build.io.image.name, str(Path(tmp) / "in.npy"), str(Path(tmp) / "out.npz"),
                                   *(t.name for t in build.io.outputs)], capture_output=True, text=True)
            if done.returncode:
                last = (done.stderr.strip().splitlines() or ["?"])[-1]
                raise CUNetError(f"{protocol} request to {build.name} failed: {last}")
            with np.load(Path(tmp) / "out.npz") as got:
                return {k: got[k] for k in got.files}


def batch_histogram(stats: dict) -> dict[int, int]:
    """{batch size: executions} from a model's statistics (/v2/models/NAME/stats)."""
    return {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in stats.get("batch_stats", [])}


def expected_backend(config_text: str) -> str:
    """The backend library a standard config needs: 'tensorrt' for platform tensorrt_plan."""
    for line in config_text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "backend":
            return value.strip().strip('"')
        if key.strip() == "platform" and "tensorrt" in value:
            return "tensorrt"
    return "?"


def check_loads(env: ServerEnv, model_dirs: list[Path], log_path: Path, http_port: int = 8000,
                grpc_port: int = 8001, metrics_port: int = 8002) -> dict[str, str]:
    """The real server loading each emitted model (deploy/triton/<name>) with auto-complete off:
    {name: verdict}; the one acceptable refusal is the missing backend library of its
    backend (this Triton has the Python backend only). CUNetError for any other refusal."""
    results, problems = {}, []
    with TritonServer(env, sorted({d.parent for d in model_dirs}), None, http_port=http_port, grpc_port=grpc_port,
                      metrics_port=metrics_port, log_path=log_path) as server:
        for model_dir in model_dirs:
            backend = expected_backend((model_dir / CONFIG_FILE).read_text())
            error = server.load_model(model_dir.name)
            if error is None:
                results[model_dir.name] = "loaded"
            elif f"unable to find backend library for backend '{backend}'" in error:
                results[model_dir.name] = f"config accepted; refused only for the missing {backend} backend library"
            else:
                problems.append(f"{model_dir.name}: {error}")
    if problems:
        raise CUNetError(f"Triton refused {'; '.join(problems)}")
    return results
