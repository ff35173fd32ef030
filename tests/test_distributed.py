"""Many processes give what one gives: DDP steps, sharded calibration and evaluation, resume
after a killed rank, rank-0-only writes. CPU, gloo, 2 processes, tiny models and faces."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from cunet_optimize import distributed
from cunet_optimize.data.synth import write_synthetic_faces
from cunet_optimize.errors import CUNetError

WORLD = 2
TINY_FIELDS = dict(width=8, growth_rate=4, neck_size=2)
TINY = ["--model", "cunet-face-small", "--set", "width=8", "--set", "growth_rate=4", "--set", "neck_size=2"]


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """14 faces (12 train: batches of 5, 5 and 2 split unevenly over 2 ranks), not conftest's 10."""
    root = tmp_path_factory.mktemp("faces") / "synth"
    write_synthetic_faces(root, 14, seed=3, test_fraction=2 / 14, progress=False)
    return root


# --------------------------------------------------------------------------------------
# Launch detection and shards (no processes)


def test_detect_launch_reads_torchrun_then_slurm():
    assert distributed.detect_launch({}) == distributed.Launch()
    run = distributed.detect_launch({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (run.rank, run.world_size, run.local_rank, run.launcher) == (1, 4, 1, "torchrun")
    slurm = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "3", "MASTER_ADDR": "n1",
             "MASTER_PORT": "29500"}
    assert distributed.detect_launch(slurm) == distributed.Launch(3, 8, 3, "slurm")
    # torchrun inside an srun step: torchrun's variables win
    assert distributed.detect_launch({**slurm, "RANK": "0", "WORLD_SIZE": "2"}).launcher == "torchrun"
    # an sbatch script's shell (no srun step) is one process, whatever the job's task count
    assert not distributed.detect_launch({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}).distributed
    with pytest.raises(CUNetError, match="MASTER_ADDR"):
        distributed.detect_launch({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2"})


def test_shards_partition_in_order():
    for count in (0, 1, 5, 6, 7):
        for world in (1, 2, 3):
            parts = [list(distributed.shard(list(range(count)), r, world)) for r in range(world)]
            assert sum(parts, []) == list(range(count))
            assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_one_process_helpers_are_the_identity():
    assert not distributed.is_active() and distributed.is_main() and distributed.world_size() == 1
    assert distributed.all_reduce(3.5, "max") == 3.5
    assert distributed.all_gather_objects("x") == ["x"]
    assert distributed.describe() == "distributed: 1 process"


# --------------------------------------------------------------------------------------
# In-process workers (torch.multiprocessing, gloo)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(worker, *args) -> None:
    port = free_port()
    mp.spawn(_bootstrap, args=(port, worker, args), nprocs=WORLD, join=True)


def _bootstrap(rank: int, port: int, worker, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        worker(*args)
    finally:
        dist.destroy_process_group()


CALIBRATION_BATCHES = [5, 1]  # test_sharded_calibration_scales_equal_single_process


def _every_case(faces, root):
    """The ranks' side of each in-process test below, one after the other in a single launch of
    the 2 ranks (each launch starts 2 interpreters that import torch): what each test compares
    with its one-process run is written under `root`."""
    _steps_both_ways(faces, root / "steps")
    _calibrate_all(faces, root / "calibration.json", CALIBRATION_BATCHES)
    _evaluate(faces, root / "eval.npz")
    _train_with_sync_bn(faces, root / "sync-bn-run")


@pytest.fixture(scope="module")
def ranks(faces, tmp_path_factory) -> Path:
    """The folder of `_every_case`'s results, launched once for the module. A rank that fails
    any case fails the launch, and every test that reads it, with that rank's traceback."""
    root = tmp_path_factory.mktemp("ranks")
    spawn(_every_case, faces, root)
    return root


def _tiny_qmodel(faces, spec="int8"):
    from cunet_optimize.models import create_model
    from cunet_optimize.quant import parse_precision
    from cunet_optimize.quant.calibrate import post_training_quantize

    torch.manual_seed(0)
    model = create_model("cunet-face-small", **TINY_FIELDS)
    images = torch.stack([torch.as_tensor(_faces(faces, "train")[i]["image"]) for i in range(4)])
    qmodel, _, _ = post_training_quantize(model, parse_precision(spec), [images], "max", None, progress=False)
    return qmodel


def _faces(faces, split, augment=False):
    from cunet_optimize.tasks import FACE, open_dataset

    return open_dataset(FACE, faces, split, augment=augment, seed=0)


def _one_step(faces, out, frozen_bn):
    """One optimizer step over one global batch of 6 training faces, LSQ scales learnable."""
    from cunet_optimize.quant.qat import save_qat_checkpoint
    from cunet_optimize.quant.qmodel import freeze_bn, set_learnable_scales
    from cunet_optimize.train.loop import TrainRecipe, train
    from cunet_optimize.data.face300w import FirstSamples

    qmodel = _tiny_qmodel(faces)
    set_learnable_scales(qmodel, True)
    recipe = TrainRecipe(epochs=1, batch_size=6, lr=1e-3, lr_schedule="cosine", lr_steps=(), checkpoint_every=0)
    train(qmodel, FirstSamples(_faces(faces, "train"), 6), None, recipe, out, progress=False,
          save_fn=save_qat_checkpoint, on_epoch_start=lambda e: freeze_bn(qmodel, frozen_bn))
    if distributed.is_main():
        torch.save({k: v.detach().clone() for k, v in qmodel.state_dict().items()}, Path(out) / "params.pt")


def _steps_both_ways(faces, root):
    for frozen in (True, False):
        _one_step(faces, root / f"ddp-{frozen}", frozen)


@pytest.mark.slow
def test_ddp_step_equals_single_process_step(faces, ranks, tmp_path):
    """Global batch 6 over 2 ranks (3 + 3) = batch 6 in one process, quantizer scales (learnable,
    LSQ) included, when BatchNorm normalises with fixed statistics (QAT after its warm-up). With
    per-batch statistics each rank normalises its 3 images alone: that is what SyncBatchNorm
    (GPUs only) fixes, and the test sees the difference."""
    for frozen in (True, False):  # (the ranks' steps: `ranks`, both BatchNorm modes)
        _one_step(faces, tmp_path / f"one-{frozen}", frozen)
    start = _tiny_qmodel(faces).state_dict()
    for frozen in (True, False):
        ddp = torch.load(ranks / "steps" / f"ddp-{frozen}" / "params.pt")
        one = torch.load(tmp_path / f"one-{frozen}" / "params.pt")
        assert ddp.keys() == one.keys()
        floats = [k for k in one if one[k].is_floating_point()]
        worst = max(float((ddp[k] - one[k]).abs().max()) for k in floats)
        moved = [k for k in floats if not torch.equal(one[k], start[k])]
        assert any(k.endswith(".scale") for k in moved) and any(k.endswith("conv1.weight") for k in moved)
        if frozen:
            assert worst <= 1e-5, worst
        else:  # per-rank BatchNorm statistics: a different step
            assert worst > 1e-4, worst
    # the run folder: only rank 0 wrote, and wrote what one process writes
    assert sorted(p.name for p in (ranks / "steps" / "ddp-True").iterdir()) == sorted(
        p.name for p in (tmp_path / "one-True").iterdir())


def _calibrate_all(faces, out, sizes):
    from cunet_optimize.models import create_model
    from cunet_optimize.quant import parse_precision
    from cunet_optimize.quant.calibrate import activation_scales, post_training_quantize

    from cunet_optimize.quant import quantize_model
    from cunet_optimize.quant.calibrate import calibrate

    data = _faces(faces, "train")
    images = torch.stack([torch.as_tensor(data[i]["image"]) for i in range(sum(sizes))])
    batches = list(torch.split(images, sizes))
    result = {}
    for method in ("max", "percentile", "entropy", "mse"):
        torch.manual_seed(0)
        model = create_model("cunet-face-small", **TINY_FIELDS)
        qmodel, factors, _ = post_training_quantize(model, parse_precision("int8"), batches, method, 0.5,
                                                    progress=False)
        result[method] = activation_scales(qmodel)
        result["equalization"] = {k: v.tolist() for k, v in factors.items()}
    # Sampled histograms (every tensor larger than max_samples): an odd stride over the global
    # batch, which starts inside rank 1's part at an offset that is not a multiple of it
    torch.manual_seed(0)
    qmodel = quantize_model(create_model("cunet-face-small", **TINY_FIELDS), parse_precision("int8"))
    calibrate(qmodel, [distributed.shard(b) for b in batches], "percentile", progress=False,
              sharded=distributed.is_active(), max_samples=1000)
    result["percentile-sampled"] = activation_scales(qmodel)
    if distributed.is_main():
        Path(out).write_text(json.dumps(result))


@pytest.mark.slow
def test_sharded_calibration_scales_equal_single_process(faces, ranks, tmp_path):
    """Batches of 5 and 1 images: rank 0 sees 3 + 1, rank 1 sees 2 + 0 (an empty part); the
    histograms binned whole and sampled."""
    _calibrate_all(faces, tmp_path / "one.json", CALIBRATION_BATCHES)
    ddp, one = (json.loads(f.read_text()) for f in (ranks / "calibration.json", tmp_path / "one.json"))
    assert ddp.keys() == one.keys()
    for method in one:
        assert ddp[method] == one[method], method  # exact: same histograms, same scales


def _evaluate(faces, out):
    from cunet_optimize.evaluation import evaluate_landmarks, torch_infer
    from cunet_optimize.models import create_model

    torch.manual_seed(0)
    model = create_model("cunet-face-small", **TINY_FIELDS)
    result = evaluate_landmarks(torch_infer(model), _faces(faces, "train"), batch_size=5, progress=False)
    if distributed.is_main():
        np.savez(out, nme=result.per_image_nme, pred=result.predictions, paths=np.array(result.paths),
                 metrics=json.dumps(result.metrics))


def test_sharded_eval_equals_single_process(faces, ranks, tmp_path):
    """12 images in batches of 5, 5, 2: rank 0 predicts batches 0 and 2, rank 1 batch 1."""
    _evaluate(faces, tmp_path / "one.npz")
    ddp, one = np.load(ranks / "eval.npz"), np.load(tmp_path / "one.npz")
    assert list(ddp["paths"]) == list(one["paths"]) and len(one["paths"]) == 12
    np.testing.assert_array_equal(ddp["pred"], one["pred"])
    np.testing.assert_array_equal(ddp["nme"], one["nme"])
    assert json.loads(str(ddp["metrics"])) == json.loads(str(one["metrics"]))


# --------------------------------------------------------------------------------------
# SyncBatchNorm (--sync-bn): what runs without a GPU


def test_sync_batchnorm_conversion_keeps_outputs_and_checkpoint_keys(faces):
    """The conversion --sync-bn applies (train/loop.py), on the QAT model: every BatchNorm
    becomes a SyncBatchNorm, the state dict keeps its keys (a --sync-bn checkpoint loads in one
    process) and, in eval mode (no statistics to synchronise), the outputs are unchanged."""
    import copy

    qmodel = _tiny_qmodel(faces).eval()
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(qmodel)).eval()
    batchnorms = [m for m in qmodel.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert batchnorms and not any(type(m) is torch.nn.BatchNorm2d for m in converted.modules())
    assert sum(isinstance(m, torch.nn.SyncBatchNorm) for m in converted.modules()) == len(batchnorms)
    assert converted.state_dict().keys() == qmodel.state_dict().keys()
    images = torch.stack([torch.as_tensor(_faces(faces, "test")[i]["image"]) for i in range(2)])
    with torch.no_grad():
        torch.testing.assert_close(converted(images)[-1], qmodel(images)[-1], rtol=0, atol=0)


def _train_with_sync_bn(faces, out):
    from cunet_optimize.models import create_model
    from cunet_optimize.train.loop import TrainRecipe, train

    model = create_model("cunet-face-small", **TINY_FIELDS)
    recipe = TrainRecipe(epochs=1, batch_size=4, checkpoint_every=0)
    with pytest.raises(CUNetError, match=r"^--sync-bn needs GPUs \(nccl\)"):
        train(model, _faces(faces, "train"), None, recipe, out, progress=False, sync_batchnorm=True)
    # why: PyTorch's SyncBatchNorm refuses CPU tensors (torch/nn/modules/batchnorm.py,
    # SyncBatchNorm.forward), and its kernel (aten::batch_norm_stats) has no CPU implementation.
    # When a PyTorch release adds one, this fails and --sync-bn can run on gloo.
    sync = torch.nn.SyncBatchNorm.convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(3))).train()
    with pytest.raises(ValueError, match="expected input tensor to be on GPU"):
        sync(torch.randn(2, 3, 4, 4))
    with pytest.raises(NotImplementedError, match="batch_norm_stats"):
        torch.batch_norm_stats(torch.randn(2, 3, 4, 4), 1e-5)


@pytest.mark.slow
def test_sync_bn_on_cpus_is_refused_with_one_line(ranks):
    """Both ranks ran `_train_with_sync_bn` (its refusals are checked there, on each rank)."""
    run = ranks / "sync-bn-run"
    assert not run.exists() or not any(run.iterdir())


# --------------------------------------------------------------------------------------
# The command line under torchrun


def torchrun(script: Path, *args, check=True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={WORLD}", str(script), *args],
                          capture_output=True, text=True, env=env)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done


# Every rank reports each file it puts in place (all artifacts go through os.replace, see
# cunet_optimize.atomic) and, when KILL_RANK is set, that rank dies after its 5th step.
WRAPPER = textwrap.dedent("""
    import os, signal, sys, torch
    rank = int(os.environ["RANK"])
    replace = os.replace
    def reporting_replace(src, dst, *a, **k):
        print(f"WRITE rank={rank} {dst}", file=sys.stderr, flush=True)
        return replace(src, dst, *a, **k)
    os.replace = reporting_replace
    if os.environ.get("KILL_RANK") == str(rank):
        step, calls = torch.optim.RMSprop.step, [0]
        def killing_step(self, *a, **k):
            out = step(self, *a, **k)
            calls[0] += 1
            if calls[0] == 5:
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        torch.optim.RMSprop.step = killing_step
    from cunet_optimize.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def qat_args(data, model, out):
    return ["qat", "--model", str(model), "--precision", "int8", "--data", str(data), "--out", str(out),
            "--epochs", "2", "--lr", "1e-4", "--batch-size", "4", "--calib-images", "6", "--checkpoint-every", "2",
            "--threads", "1", "--json"]


@pytest.mark.slow
def test_qat_under_torchrun_resumes_after_a_killed_rank_and_only_rank_0_writes(faces, tmp_path, monkeypatch):
    """qat with 2 processes: rank 1 SIGKILLed after its 5th step (epoch 2, batch 2 of 3; state
    saved at step 4 by rank 0); torchrun stops the job; the same command again resumes and ends
    with the weights of an uninterrupted 2-process run."""
    from cunet_optimize.models import create_model, save_checkpoint

    model = tmp_path / "fp32.safetensors"
    torch.manual_seed(0)
    save_checkpoint(create_model("cunet-face-small", **TINY_FIELDS), model)
    script = tmp_path / "wrapper.py"
    script.write_text(WRAPPER)

    straight = torchrun(script, *qat_args(faces, model, tmp_path / "straight"))
    assert straight.stdout.count('"world_size": 2') == 1  # one summary, from rank 0
    assert "distributed: 2 processes, gloo" in straight.stderr  # --json: the line goes to stderr
    writes = [line for line in straight.stderr.splitlines() if line.startswith("WRITE")]
    assert writes and all(w.startswith("WRITE rank=0 ") for w in writes), writes
    assert {Path(w.split()[-1]).name for w in writes} >= {"train_state.pt", "best.safetensors", "last.safetensors",
                                                            "history.json"}

    monkeypatch.setenv("KILL_RANK", "1")
    killed = torchrun(script, *qat_args(faces, model, tmp_path / "killed"), check=False)
    assert killed.returncode != 0
    assert not (tmp_path / "killed" / "last.safetensors").exists()
    state = torch.load(tmp_path / "killed" / "train_state.pt", weights_only=True)
    assert (state["epoch"], state["batch_pos"], state["iteration"]) == (1, 1, 4)
    monkeypatch.delenv("KILL_RANK")
    resumed = torchrun(script, *qat_args(faces, model, tmp_path / "killed"))
    assert all(w.startswith("WRITE rank=0 ") for w in resumed.stderr.splitlines() if w.startswith("WRITE"))
    a = load_file(tmp_path / "killed" / "last.safetensors")
    b = load_file(tmp_path / "straight" / "last.safetensors")
    assert a.keys() == b.keys()
    for key in b:
        assert torch.equal(a[key], b[key]), key
    # (train_loss of the resumed epoch averages only the batches after the resume, as in one process)
    strip = lambda h: [{k: v for k, v in e.items() if k != "train_loss"} for e in h]
    assert strip(json.loads(resumed.stdout)["history"]) == strip(json.loads(straight.stdout)["history"])


def test_commands_without_multi_process_support_refuse_a_launch(monkeypatch, capsys):
    from cunet_optimize.cli import main

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["targets"]) == 2
    assert "runs in one process" in capsys.readouterr().err


# --------------------------------------------------------------------------------------
# build under torchrun: rank 0 builds, the others share calibration and the accuracy stage

# Every rank reports each file or folder it creates or writes. BREAK_ON_RANK="R module:attr
# ERROR" makes that callable raise ERROR (RuntimeError: a bug; CUNetError: a user's error) on
# rank R; INT8_FORM_TIMES makes the INT8 CPU timings prefer the clamp form, so the variant
# gate evaluates it (on every rank) in each run.
BUILD_WRAPPER = textwrap.dedent("""
    import builtins, importlib, os, sys
    rank = int(os.environ.get("RANK", "0"))
    def report(what, path):
        print(f"WRITE rank={rank} {what} {path}", file=sys.stderr, flush=True)
    replace, mkdir, open_ = os.replace, os.mkdir, builtins.open
    def reporting_replace(src, dst, *a, **k):
        report("replace", dst)
        return replace(src, dst, *a, **k)
    def reporting_mkdir(path, *a, **k):
        report("mkdir", path)
        return mkdir(path, *a, **k)
    def reporting_open(file, mode="r", *a, **k):
        if any(c in mode for c in "wax+") and file != os.devnull:
            report("open", file)
        return open_(file, mode, *a, **k)
    os.replace, os.mkdir, builtins.open = reporting_replace, reporting_mkdir, reporting_open
    from cunet_optimize.errors import CUNetError
    if os.environ.get("BREAK_ON_RANK"):
        r, target, error = os.environ["BREAK_ON_RANK"].split()
        if int(r) == rank:
            module, attr = target.split(":")
            owner = importlib.import_module(module)
            *path, name = attr.split(".")
            for p in path:
                owner = getattr(owner, p)
            def broken(*a, **k):
                raise {"RuntimeError": RuntimeError, "CUNetError": CUNetError}[error](f"{name} broken by the test")
            setattr(owner, name, broken)
    if os.environ.get("INT8_FORM_TIMES"):
        from cunet_optimize.engines import onnxrt
        from cunet_optimize.engines.base import Timing
        def clamp_first(candidates, **kwargs):
            ms = [(0.0 if key[0] == "clamp" else 1.0) + i * 1e-3 for i, key in enumerate(candidates)]
            return {key: Timing(t, (t, t)) for key, t in zip(candidates, ms)}
        onnxrt.time_candidate_timings = clamp_first
    from cunet_optimize.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def build_args(model, faces, workdir, *extra):
    return ["build", "--model", str(model), "--precision", "int8", "--calib-data", str(faces), "--calib-split",
            "train", "--calib-images", "7", "--eval-data", str(faces), "--eval-split", "train",
            "--workdir", str(workdir), "--json", *extra]


@pytest.fixture(scope="module")
def many_faces(tmp_path_factory):
    """36 faces: evaluation batches of 16, 16 and 4 (rank 0 takes the first and the last)."""
    root = tmp_path_factory.mktemp("faces") / "synth36"
    write_synthetic_faces(root, 36, seed=4, test_fraction=1 / 36, progress=False)
    return root


@pytest.mark.slow
def test_build_under_torchrun_equals_one_process_build_and_only_rank_0_writes(many_faces, tiny, tmp_path,
                                                                             monkeypatch):
    """int8 for the CPU, 7 calibration images (one batch: 4 + 3 per rank), 35 evaluation images
    (batches of 16, 16, 3: rank 0 takes two, rank 1 one). Scales, ONNX bytes, the INT8 variant
    gate and the accuracy gate equal a one-process build's."""
    monkeypatch.setenv("INT8_FORM_TIMES", "clamp")
    script = tmp_path / "wrapper.py"
    script.write_text(BUILD_WRAPPER)
    extra = ["--no-accuracy-gate"]
    ddp = torchrun(script, *build_args(tiny, many_faces, tmp_path / "ddp"), *extra)
    assert "distributed: 2 processes, gloo" in ddp.stderr
    writes = re.findall(r"WRITE rank=(\d+) (\S+ \S+)", ddp.stderr)  # (a progress bar may precede one)
    assert writes and all(r == "0" for r, _ in writes), [w for w in writes if w[0] != "0"]

    # the one-process build in this process, its INT8 form timings made to prefer clamp as the wrapper's
    from conftest import run_build_json
    from cunet_optimize.engines import onnxrt
    from cunet_optimize.engines.base import Timing

    def clamp_first(candidates, **kwargs):
        ms = [(0.0 if key[0] == "clamp" else 1.0) + i * 1e-3 for i, key in enumerate(candidates)]
        return {key: Timing(t, (t, t)) for key, t in zip(candidates, ms)}

    monkeypatch.setattr(onnxrt, "time_candidate_timings", clamp_first)
    a, b = run_build_json([*build_args(tiny, many_faces, tmp_path / "one"), *extra]), json.loads(ddp.stdout)
    out_a, out_b = (tmp_path / w / "engines" / "tiny-int8-cpu" for w in ("one", "ddp"))
    assert (out_a / "model.onnx").read_bytes() == (out_b / "model.onnx").read_bytes()
    assert (json.loads(Path(a["calibration"]["scales_file"]).read_text())["scales"]
            == json.loads(Path(b["calibration"]["scales_file"]).read_text())["scales"])
    checks = a["surgery"]["int8_cpu_form"]["accuracy_checks"]
    assert "clamp" in checks and checks == b["surgery"]["int8_cpu_form"]["accuracy_checks"]
    for key in ("reference", "quantized", "degradation_points", "passed", "data"):
        assert a["accuracy"][key] == b["accuracy"][key], key
    assert a["accuracy"]["quantized"]["count"] == 35
    drop = lambda settings: {k: v for k, v in settings.items() if k != "source_onnx"}  # the staging folder
    assert drop(a["engine_settings"]) == drop(b["engine_settings"])


@pytest.mark.slow
@pytest.mark.parametrize("failing", ["rank 1 evaluating its images", "rank 0 linting the graph"])
def test_a_failed_build_under_torchrun_stops_every_rank_with_one_line(failing, many_faces, tiny, tmp_path,
                                                                       monkeypatch):
    script = tmp_path / "wrapper.py"
    script.write_text(BUILD_WRAPPER)
    """A rank's error inside a shared stage (rank 1, evaluating the FP32 reference while rank 0
    evaluates its batches) or rank 0's outside one (lint, after the shared calibration): every
    rank exits non-zero, the error is one line, the staging folder is gone."""
    if failing.startswith("rank 1"):
        monkeypatch.setenv("BREAK_ON_RANK",
                           "1 cunet_optimize.engines.onnxrt:OnnxRuntimeSessionRunner.infer_impl RuntimeError")
        extra, expected = ["--precision", "fp32"], "error: rank 1: RuntimeError: infer_impl broken by the test"
    else:
        monkeypatch.setenv("BREAK_ON_RANK", "0 cunet_optimize.surgery:lint_model CUNetError")
        extra, expected = [], "error: lint_model broken by the test"
    try:
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               f"--nproc_per_node={WORLD}", str(script),
                               *build_args(tiny, many_faces, tmp_path), *extra],
                              capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                              timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{failing}: the ranks hung")
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("cunet-optimize build: error:")]
    assert len(errors) == 1 and expected in errors[0], done.stderr[-3000:]
    assert not re.search(r'File ".*cunet_optimize', done.stderr)  # (torchrun prints its own summary)
    assert not [p for p in (tmp_path / "engines").iterdir()]  # nothing half-written, nothing kept


def test_precision_auto_search_refuses_a_multi_process_launch(monkeypatch, capsys, tiny, tmp_path):
    from cunet_optimize.cli import main

    monkeypatch.setattr(distributed, "is_active", lambda: True)
    assert main(["build", "--model", str(tiny), "--precision", "auto", "--workdir", str(tmp_path)]) == 2
    assert "searches its plan in one process" in capsys.readouterr().err
