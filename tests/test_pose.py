"""Human pose as a task: MPII data, PCKh, the synthetic pose set, task checks, and a pose build end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cunet_optimize import tasks
from cunet_optimize.cli import main
from cunet_optimize.data.face300w import DataError
from cunet_optimize.data.mpii import ANNOTATION_FILE, MPIIDataset
from cunet_optimize.data.synth import write_synthetic_faces
from cunet_optimize.data.synth_pose import synth_pose, write_synthetic_poses
from cunet_optimize.data.transforms import MPII_FLIP_PERM
from cunet_optimize.evaluation import evaluate_landmarks, flip_test
from cunet_optimize.metrics import pckh_curve, pckh_errors
from cunet_optimize.models import create_model, save_checkpoint
from cunet_optimize.models.batchnorm import reestimate_batchnorm


@pytest.fixture(scope="module")
def poses(tmp_path_factory):
    root = tmp_path_factory.mktemp("poses") / "synth"
    write_synthetic_poses(root, 12, seed=4, test_fraction=0.34, progress=False)
    return root


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    root = tmp_path_factory.mktemp("faces") / "synth"
    write_synthetic_faces(root, 4, seed=1, test_fraction=0.5, progress=False)
    return root


@pytest.fixture(scope="module")
def tiny_pose(tmp_path_factory, poses):
    """Random weights with BatchNorm statistics re-estimated on pose images (no training)."""
    torch.manual_seed(0)
    model = create_model("cunet-pose-n16k1", num_unets=2, width=16, growth_rate=8, num_heads=2)
    train = MPIIDataset(poses / ANNOTATION_FILE, poses / "images", split="train")
    reestimate_batchnorm(model, np.stack([train[i]["image"].numpy() for i in range(4)]))
    path = tmp_path_factory.mktemp("model") / "tinypose.safetensors"
    save_checkpoint(model, path, {"task": "pose"})
    return path


# ------------------------------------------------------------------ MPII layout, task detection


def _hand_written_mpii(root):
    """Three people in the authors' JSON layout: 1-based coordinates, two validation records."""
    (root / "images").mkdir(parents=True)
    Image.new("RGB", (120, 100), (90, 90, 90)).save(root / "images" / "a.png")
    joints = [[10.0 + 5 * j, 20.0 + 3 * j, 1.0] for j in range(16)]
    joints[4] = [0.0, 0.0, 0.0]  # l_knee unannotated (MPII: coordinates <= 0)
    joints[9][2] = 0.0  # head top annotated but occluded: still counts for PCKh
    record = {"img_paths": "a.png", "joint_self": joints, "objpos": [60.0, 50.0], "scale_provided": 0.4,
              "normalizer": 25.0, "dataset": "MPII"}
    anno = [{**record, "isValidation": 1.0}, {**record, "isValidation": 0.0}, {**record, "isValidation": 1.0}]
    (root / ANNOTATION_FILE).write_text(json.dumps(anno))
    return joints


def test_mpii_folder_is_pose_data_and_splits_map_to_isvalidation(tmp_path, faces):
    joints = _hand_written_mpii(tmp_path / "mpii")
    folder, json_file = tmp_path / "mpii", tmp_path / "mpii" / ANNOTATION_FILE
    assert tasks.task_of_data(folder) is tasks.POSE and tasks.task_of_data(json_file) is tasks.POSE
    assert tasks.task_of_data(faces) is tasks.FACE
    assert tasks.mpii_paths(json_file) == (json_file, folder / "images")
    sizes = {split: len(tasks.open_dataset(tasks.POSE, folder, split)) for split in ("test", "train", "calib", None)}
    assert sizes == {"test": 2, "train": 1, "calib": 1, None: 3}
    item = tasks.open_dataset(tasks.POSE, json_file, "test")[0]
    np.testing.assert_allclose(item["landmarks"][0].numpy(), np.array(joints[0][:2]) - 1.0)  # 1-based -> 0-based
    assert item["visible"][4] == 0 and item["visible"][9] == 1 and item["visible"].sum() == 15
    assert float(item["head_size"]) == pytest.approx(0.6 * 25.0)
    with pytest.raises(DataError, match="no split 'common'"):
        tasks.open_dataset(tasks.POSE, folder, "common")
    with pytest.raises(DataError, match="data not found"):
        tasks.task_of_data(tmp_path / "missing")


# ----------------------------------------------------------------------------------- metrics


def test_pckh_curve_hand_computed():
    errors = np.array([[0.1, 0.3, 0.6, 9.0], [0.2, np.nan, 0.45, 0.05]])  # head sizes; NaN = broken prediction
    visible = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=bool)
    t, f = pckh_curve(errors, visible, max_threshold=0.5, steps=6, exclude=(3,))
    np.testing.assert_allclose(t, [0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    # counted: 0.1, 0.3, 0.6, 0.2, NaN (wrong), 0.45 -> six joints (joint 3 excluded)
    np.testing.assert_allclose(f, np.array([0, 1, 2, 3, 3, 4]) / 6)
    pred = np.zeros((1, 2, 2))
    gt = np.array([[[3.0, 4.0], [0.0, 1.0]]])
    np.testing.assert_allclose(pckh_errors(pred, gt, np.array([10.0])), [[0.5, 0.1]])


def _oracle(dataset):
    """A perfect pose model as an infer function: the ground-truth heatmaps of each image, and for a
    mirrored image the mirrored heatmaps with left and right swapped (what a perfect model sees)."""
    table = {}
    for i in range(len(dataset)):
        item = dataset[i]
        image, heat = item["image"].numpy(), item["heatmaps"].numpy()
        table[image.tobytes()] = heat
        table[np.ascontiguousarray(image[..., ::-1]).tobytes()] = np.ascontiguousarray(heat[MPII_FLIP_PERM, :, ::-1])

    def infer(images):
        return np.stack([table[np.ascontiguousarray(x).tobytes()] for x in images])

    return infer


def test_pose_evaluation_scores_pckh_and_flip_test_swaps_left_and_right(poses):
    dataset = tasks.open_dataset(tasks.POSE, poses, "test")
    infer = _oracle(dataset)
    direct = evaluate_landmarks(infer, dataset, progress=False)
    flipped = evaluate_landmarks(infer, dataset, flip=True, progress=False)
    assert direct.settings["task"] == "pose" and direct.settings["metric"] == "PCKh@0.5"
    assert direct.metrics["pckh_percent"] == pytest.approx(100.0)
    assert flipped.metrics["pckh_percent"] == pytest.approx(100.0)
    assert set(direct.metrics["per_joint_percent"]) >= {"r_ankle", "l_wrist", "head_top"}
    assert direct.joint_errors.shape == (len(dataset), 16) and direct.visible.dtype == bool
    # the same flip test without the left/right permutation mixes the sides: many joints go wrong
    wrong = flip_test(infer, np.arange(16))
    mixed = evaluate_landmarks(wrong, dataset, progress=False)
    assert mixed.metrics["pckh_percent"] < 90.0


# ------------------------------------------------------------------------- synthetic pose set


def test_synthetic_pose_set_is_deterministic_and_mpii_readable(tmp_path, poses):
    again = tmp_path / "again"
    write_synthetic_poses(again, 12, seed=4, test_fraction=0.34, progress=False)
    assert (again / ANNOTATION_FILE).read_bytes() == (poses / ANNOTATION_FILE).read_bytes()
    assert (again / "images" / "00003.png").read_bytes() == (poses / "images" / "00003.png").read_bytes()
    other = synth_pose(5, 3)[1]
    assert other["joint_self"] != json.loads((poses / ANNOTATION_FILE).read_text())[3]["joint_self"]
    records = json.loads((poses / ANNOTATION_FILE).read_text())
    assert len(records) == 12 and sum(r["isValidation"] for r in records) == 4
    assert {"img_paths", "joint_self", "objpos", "scale_provided", "normalizer", "isValidation",
            "dataset"} <= set(records[0])
    assert len(MPIIDataset(poses / ANNOTATION_FILE, poses / "images", split="train")) == 8
    with pytest.raises(Exception, match="not empty"):
        write_synthetic_poses(poses, 3, seed=0, progress=False)


def test_synthetic_poses_have_occluded_and_unannotated_joints():
    flags, outside = [], 0
    for i in range(80):
        image, record = synth_pose(0, i)
        joints = np.asarray(record["joint_self"])
        assert joints.shape == (16, 3) and record["normalizer"] > 0 and record["scale_provided"] > 0
        annotated = (joints[:, 0] > 0) & (joints[:, 1] > 0)
        outside += int((~annotated).sum())
        # an annotated joint lies in the image (1-based: 1 .. size)
        assert np.all((joints[annotated, :2] >= 1.0) & (joints[annotated, :2] <= image.size[0]))
        assert np.all(joints[~annotated] == [-1, -1, 0])
        flags += list(joints[annotated, 2])
    assert outside > 0 and 0 < flags.count(0.0) < 0.2 * len(flags)


# ------------------------------------------------------------------------------- task checks


@pytest.mark.parametrize("model_kind", ["face", "pose"])
@pytest.mark.parametrize("command", ["eval", "calibrate", "build"])
def test_model_and_data_of_different_tasks_is_one_line_exit_2(model_kind, command, tiny_pose, poses, faces,
                                                              tmp_path, capsys):
    model = [] if model_kind == "face" else ["--model", str(tiny_pose)]  # face: the embedded default
    data = poses if model_kind == "face" else faces
    flag = {"eval": "--data", "calibrate": "--data", "build": "--calib-data"}[command]
    extra = [] if command == "eval" else ["--workdir", str(tmp_path)]
    assert main([command, *model, flag, str(data), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"{data}:" in err and ("a 68-point face model" if model_kind == "face" else "a 16-joint pose model") in err
    assert not (tmp_path / "engines").exists() and not (tmp_path / "calib").exists()  # nothing started


# --------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_train_on_pose_data_records_the_task_and_pckh(poses, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", "cunet-pose-n16k1", "--set", "num_unets=2", "--set", "width=8",
                 "--set", "growth_rate=4", "--set", "num_heads=2", "--data", str(poses), "--out", str(out),
                 "--epochs", "1", "--batch-size", "4", "--threads", "1", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert 0.0 <= summary["best_val_pckh_percent"] <= 100.0 and "val_pckh" in summary["history"][0]
    from cunet_optimize.models import load_model

    assert tasks.task_of_model(load_model(out / "best.safetensors")) is tasks.POSE
    assert load_model(out / "best.safetensors").checkpoint_metadata["task"] == "pose"


@pytest.mark.slow
def test_build_int8_tiny_pose_model_gates_on_pckh_and_profiles(tiny_pose, poses, tmp_path, capsys):
    common = ["--model", str(tiny_pose), "--precision", "int8", "--calib-data", str(poses), "--calib-images", "4",
              "--eval-data", str(poses), "--workdir", str(tmp_path)]
    assert main(["build", *common, "--no-accuracy-gate", "--max-pckh-decrease", "2.5", "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    acc = manifest["accuracy"]
    assert acc["task"] == "pose" and acc["metric"] == "PCKh@0.5" and acc["higher_is_better"] is True
    assert acc["tolerance"] == 2.5 and acc["tolerance_option"] == "--max-pckh-decrease"
    assert acc["reference"]["count"] == acc["quantized"]["count"] == 4  # the validation records
    assert acc["reference_value"] == acc["reference"]["pckh_percent"]
    assert acc["degradation_points"] == pytest.approx(acc["reference_value"] - acc["quantized_value"])
    assert acc["passed"] == (acc["degradation_points"] <= 2.5)
    assert manifest["eval_data"]["task"] == "pose" and manifest["calibration"]["images"] == 4
    assert manifest["calibration"]["data"] == str(poses.resolve())

    # the gate in PCKh points: no model can lose less than -100 points, so this one must fail
    # (the CLI refuses a negative tolerance; the API takes it, to force the failure)
    from cunet_optimize.pipeline import BuildOptions, run_build
    from cunet_optimize.errors import CUNetError

    strict = BuildOptions(precision="int8", model=str(tiny_pose), calib_data=str(poses), calib_images=4,
                          eval_data=str(poses), workdir=str(tmp_path), name="strict", max_pckh_decrease=-101)
    with pytest.raises(CUNetError, match="accuracy gate failed: PCKh@0.5.*--max-pckh-decrease"):
        run_build(strict, echo=lambda *_: None, progress=False)
    assert not (tmp_path / "engines" / "strict").exists()

    build = tmp_path / "engines" / "tinypose-int8-cpu"
    assert main(["profile", str(build), "--workdir", str(tmp_path), "--runs", "2", "--warmup", "0",
                 "--batch-sizes", "1", "--memory", "off", "--layer-runs", "0", "--out", "pose"]) == 0
    printed = capsys.readouterr().out
    assert "PCKh@0.5 %" in printed
    profile = json.loads((tmp_path / "reports" / "pose.json").read_text())
    engine = next(v for v in profile["variants"] if v["name"] == "tinypose-int8-cpu")
    assert engine["accuracy"]["task"] == "pose" and "pckh_delta_points" in engine["accuracy"]
    assert len(engine["accuracy"]["pckh_curve"]["fraction"]) == 51
    html = (tmp_path / "reports" / "pose.html").read_text()
    assert "PCKh vs threshold" in html and "PCKh@0.5 per joint" in html and "r_ankle" in html
