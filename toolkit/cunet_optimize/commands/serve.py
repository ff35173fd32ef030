"""`cunet-optimize serve`: a real Triton Inference Server over CPU builds (KServe v2 over HTTP
and gRPC, health and metrics), until Ctrl-C; `--validate` checks what builds emitted for
serving (deploy/), `--check` sends one request each way and compares it with the engine run
in-process. The server and its environment: serving/server.py, serving/server_env.py."""

from __future__ import annotations

import signal
import tempfile
import time
from pathlib import Path

import numpy as np

from cunet_optimize.commands.common import non_negative_int, print_json
from cunet_optimize.errors import CUNetError


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("serve", help="serve CPU builds with Triton (HTTP, gRPC, metrics) until Ctrl-C")
    p.add_argument("engine_dirs", nargs="+", metavar="ENGINE_DIR",
                   help="build folders (WORKDIR/engines/NAME); each is served as the model NAME, input `image`")
    p.add_argument("--address", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine)")
    p.add_argument("--http-port", type=non_negative_int, default=8000, help="KServe v2 HTTP port (default 8000)")
    p.add_argument("--grpc-port", type=non_negative_int, default=8001, help="KServe v2 gRPC port (default 8001)")
    p.add_argument("--metrics-port", type=non_negative_int, default=8002, help="Prometheus metrics (default 8002)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--validate", action="store_true",
                      help="check each build's deploy/ (Triton's schema, the ONNX, nvinfer keys) and have the "
                           "server load each emitted repository, then exit; any target")
    mode.add_argument("--check", action="store_true",
                      help="start, send one request over HTTP and one over gRPC per model, compare them with the "
                           "engine's in-process outputs, print the server's statistics, stop")
    p.add_argument("--json", action="store_true", help="print --validate / --check results as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    from cunet_optimize.serving.server_env import ensure_server_env

    dirs = [Path(d) for d in args.engine_dirs]
    missing = [d for d in dirs if not d.is_dir()]
    if missing:
        raise CUNetError(f"{missing[0]}: no such build folder; give folders under WORKDIR/engines/")
    if args.validate:
        return _validate(args, dirs, ensure_server_env())
    from cunet_optimize.serving.server import check_servable

    builds = [check_servable(d) for d in dirs]  # every refusal before the server starts
    names = [b.name for b, _ in builds]
    if len(set(names)) != len(names):
        raise CUNetError(f"two builds named {sorted(n for n in names if names.count(n) > 1)[0]!r}: each is served "
                         "as a model named after its folder; rename one (build --name)")
    return _serve(args, builds, ensure_server_env())


def _server(args, env, repositories, load, log_path):
    from cunet_optimize.serving.server import TritonServer

    return TritonServer(env, repositories, load, address=args.address, http_port=args.http_port,
                        grpc_port=args.grpc_port, metrics_port=args.metrics_port, log_path=log_path)


def _validate(args, dirs: list[Path], env) -> int:
    from cunet_optimize.serving.deploy import triton_model_dirs, validate_deployment
    from cunet_optimize.serving.server import check_loads

    results = {str(d): validate_deployment(d) for d in dirs}
    model_dirs = [m for d in dirs for m in triton_model_dirs(d)]
    with tempfile.TemporaryDirectory(prefix="cunet-serve-") as tmp:
        loads = check_loads(env, model_dirs, Path(tmp) / "tritonserver.log", args.http_port, args.grpc_port,
                            args.metrics_port)
    for d in dirs:
        for m in triton_model_dirs(d):
            results[str(d)][f"tritonserver --disable-auto-complete-config: {m.name}"] = loads[m.name]
    if args.json:
        print_json(results)
        return 0
    for d, verdicts in results.items():
        print(d)
        for what, verdict in verdicts.items():
            print(f"  {what}: {verdict}")
    return 0


def _serve(args, builds, env) -> int:
    from cunet_optimize.serving.server import batch_histogram, write_served_repository
    from cunet_optimize.serving.server_env import TRITON_VERSION

    with tempfile.TemporaryDirectory(prefix="cunet-serve-") as tmp:
        repo = Path(tmp) / "repository"
        repo.mkdir()
        write_served_repository(builds, env, repo)
        log = Path(tmp) / "tritonserver.log"
        names = [b.name for b, _ in builds]
        with _server(args, env, [repo], names, log) as server:
            if args.check:
                report = {b.name: _check(server, b) for b, _ in builds}
                for name in names:
                    report[name]["batches"] = batch_histogram(server.stats(name))
                if args.json:
                    print_json(report)
                else:
                    for name, r in report.items():
                        print(f"{name}: HTTP {r['http']}, gRPC {r['grpc']}; executions by batch size {r['batches']}")
                return 0 if all(r["equal"] for r in report.values()) else 1
            # `docker stop`, Kubernetes and systemd stop with SIGTERM: the same clean stop as Ctrl-C
            signal.signal(signal.SIGTERM, _interrupt)
            try:  # before the line that tells a user (or a test) to press Ctrl-C: it may come at once
                print(f"serving {', '.join(names)} (Triton {TRITON_VERSION}, Python backend + ONNX Runtime) on "
                      f"http://{args.address}:{args.http_port} and grpc {args.address}:{args.grpc_port}, metrics "
                      f"http://{args.address}:{args.metrics_port}/metrics; Ctrl-C stops it", flush=True)
                while server.process.poll() is None:
                    time.sleep(0.5)
            except KeyboardInterrupt:
                status = server.stop()
                print(f"stopped (tritonserver exited with status {status})")
                return 0
            raise CUNetError(f"tritonserver exited with status {server.process.returncode}: {server._log_tail()}")


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _check(server, build) -> dict:
    """One batch of 2 images over HTTP and over gRPC vs the engine in this process, every output
    (the heatmaps, and the landmarks of a build --landmarks) compared by name."""
    from cunet_optimize.engines.onnxrt import OnnxRuntimeRunner

    images = np.random.default_rng(0).random((2, *build.io.image.shape[1:]), dtype=np.float32)
    with OnnxRuntimeRunner(build.build_dir) as runner:
        reference = runner.infer_all(images)
    result, equal = {"outputs": sorted(reference)}, True
    for protocol in ("http", "grpc"):
        got = server.infer(protocol, build, images)
        differ = {name: (float(np.abs(got[name] - ref).max()) if name in got and got[name].shape == ref.shape
                         else float("nan")) for name, ref in reference.items()
                  if not (name in got and np.array_equal(got[name], ref))}
        equal &= not differ
        result[protocol] = ("outputs identical to in-process" if not differ else
                            "differs from in-process: " + ", ".join(f"{n} (max abs {d:.3g})" for n, d in differ.items()))
    result["equal"] = equal
    return result
