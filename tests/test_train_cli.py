"""train / eval / predict end to end on a tiny model and a few synthetic faces."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from safetensors.torch import load_file

from cunet_optimize.cli import main
from cunet_optimize.data.synth import write_synthetic_faces

TINY = ["--model", "cunet-face-small", "--set", "width=8", "--set", "growth_rate=4", "--set", "neck_size=2"]


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    root = tmp_path_factory.mktemp("faces") / "synth"
    write_synthetic_faces(root, 14, seed=3, test_fraction=2 / 14, progress=False)
    return root


def train_args(data, out, epochs=2):
    return ["train", *TINY, "--data", str(data), "--out", str(out), "--epochs", str(epochs),
            "--batch-size", "4", "--checkpoint-every", "2", "--lr", "1e-3", "--threads", "1", "--json"]


def test_train_writes_checkpoints_and_history(faces, tmp_path, capsys):
    assert main(train_args(faces, tmp_path / "run")) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["epochs"] == 2 and len(summary["history"]) == 2
    assert all(h["val_nme"] > 0 for h in summary["history"])
    for name in ("best.safetensors", "last.safetensors", "history.json", "train_state.pt"):
        assert (tmp_path / "run" / name).is_file()
    # the best checkpoint is a self-describing model that eval can read
    assert main(["eval", "--model", str(tmp_path / "run" / "best.safetensors"), "--data", str(faces),
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["metrics"]["count"] == 2
    assert result["settings"]["crop_policy"] and result["settings"]["normalizer"] == "inter_ocular"


@pytest.mark.slow
def test_resume_after_kill_mid_epoch_gives_identical_weights(faces, tmp_path, capsys):
    """A run SIGKILLed after its 5th optimizer step (epoch 2, batch 2 of 3; last state
    saved at step 4) and resumed ends with the same weights as an uninterrupted run. Only the
    killed run needs a process of its own: the resumed and the straight run are this one's."""
    args = train_args(faces, tmp_path / "killed", epochs=2)
    killer = textwrap.dedent(f"""
        import os, signal, torch
        step = torch.optim.RMSprop.step
        calls = [0]
        def killing_step(self, *a, **k):
            out = step(self, *a, **k)
            calls[0] += 1
            if calls[0] == 5:
                os.kill(os.getpid(), signal.SIGKILL)
            return out
        torch.optim.RMSprop.step = killing_step
        from cunet_optimize.cli import main
        main({args!r})
    """)
    killed = subprocess.run([sys.executable, "-c", killer], capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (tmp_path / "killed" / "last.safetensors").exists()
    assert main(args) == 0  # resumes from train_state.pt
    assert main(train_args(faces, tmp_path / "straight", epochs=2)) == 0
    capsys.readouterr()
    resumed = load_file(tmp_path / "killed" / "last.safetensors")
    straight = load_file(tmp_path / "straight" / "last.safetensors")
    assert resumed.keys() == straight.keys()
    for key in straight:
        assert (resumed[key] == straight[key]).all(), key


def test_predict_writes_landmarks_and_pictures(faces, tmp_path, capsys):
    model = tmp_path / "m.safetensors"
    from cunet_optimize.models import create_model, save_checkpoint

    save_checkpoint(create_model("cunet-face-small", width=8, growth_rate=4, neck_size=2), model)
    image = sorted((faces / "images").glob("*.png"))[0]
    assert main(["predict", str(image), "--model", str(model), "--out-dir", str(tmp_path / "out"),
                 "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert len(entry["landmarks"]) == 68
    assert (tmp_path / "out" / f"{image.stem}.landmarks.png").is_file()


def test_bad_inputs_exit_2(faces, tmp_path, capsys):
    assert main(["predict", str(tmp_path / "missing.png"), "--model", "cunet-face-small"]) == 2
    assert "missing.png" in capsys.readouterr().err
    assert main(["eval", "--model", "cunet-face-small", "--data", str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main(["train", *TINY, "--data", str(faces), "--lr-steps", "x"]) == 2
    assert main(["predict", "a.png", "--box", "1,2,3"]) == 2


@pytest.mark.slow
def test_qat_fine_tunes_a_checkpoint_that_build_exports(faces, tmp_path, capsys):
    """train -> qat (calibrated start, resumable run folder) -> build --qat, on a tiny model."""
    train = train_args(faces, tmp_path / "run", epochs=1)
    # at lr 1e-3 one epoch collapses this tiny net (validation NME ~147%) and QAT gradients vanish
    train[train.index("--lr") + 1] = "1e-4"
    assert main(train) == 0
    capsys.readouterr()
    fp32 = tmp_path / "run" / "best.safetensors"
    qat = ["qat", "--model", str(fp32), "--precision", "int8", "--data", str(faces), "--out", str(tmp_path / "qat"),
           "--epochs", "2", "--lr", "1e-4", "--batch-size", "4", "--calib-images", "4", "--no-equalize",
           "--threads", "1", "--json"]  # no equalization: the weights start as the FP32 ones
    assert main(qat) == 0
    summary = json.loads(capsys.readouterr().out)
    # the same Q/DQ placement as build and calibrate by default (conv inputs only)
    assert summary["scheme"] == "int8-convin" and summary["epochs"] == 2 and summary["lr"] == 1e-4
    # "10% of the original schedule" means the checkpoint's own training, which train recorded
    assert summary["original_schedule"] == {"epochs": 1, "lr": 1e-4, "origin": "from the checkpoint's training record"}
    assert [h["epoch"] for h in summary["history"]] == [1, 2]
    # the checkpoint rebuilds the fake-quantized model, scales included, with trained weights
    # (that QAT steps lower the loss: tests/test_quant_qmodel.py)
    from cunet_optimize.quant.qat import load_qat_checkpoint

    qmodel = load_qat_checkpoint(summary["qat_checkpoint"])
    assert qmodel.scheme.spec == "int8-convin"
    assert all(q.calibrated for q in qmodel.modules() if hasattr(q, "calibrated"))
    start = load_file(str(fp32))
    moved = [k for k, v in qmodel.state_dict().items() if k in start and v.dtype.is_floating_point
             and v.shape == start[k].shape and not (v == start[k]).all()]
    assert any(k.endswith("conv.weight") or k.endswith("conv1.weight") for k in moved)
    # a finished run is not redone: qat again resumes at the end and trains nothing more
    assert main(qat) == 0
    assert json.loads(capsys.readouterr().out)["history"] == summary["history"]
    assert main(["build", "--precision", "int8", "--qat", summary["qat_checkpoint"], "--model", str(fp32),
                 "--eval-data", str(faces), "--no-accuracy-gate", "--workdir", str(tmp_path / "w"), "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["calibration"]["method"] == "qat" and manifest["engine_built"]
