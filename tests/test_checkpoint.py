"""Checkpoints: our safetensors format, the authors' .pth.tar, and clear errors for misfits."""

from __future__ import annotations

import pickle

import pytest
import torch

from conftest import tiny_config
from cunet_optimize.cli import main
from cunet_optimize.errors import CheckpointError, CUNetError
from cunet_optimize.models import CUNet, load_model, save_checkpoint
from cunet_optimize.models.checkpoint import read_checkpoint


def authors_style_file(path, model: CUNet, drop_counters: bool = False):
    """Write `model` the way the authors' code saves: DataParallel keys in a dict."""
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    if drop_counters:  # PyTorch 0.4.0 files have no num_batches_tracked
        sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    torch.save({"train_history": {"epoch": []}, "state_dict": sd, "optimizer": {}}, path)
    return path


def outputs(model, x):
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return CUNet(tiny_config(num_unets=3, order=2, num_heads=3))


def test_safetensors_round_trip_is_self_describing(tmp_path, model):
    path = save_checkpoint(model, tmp_path / "m.safetensors", {"note": "test"})
    loaded = load_model(path)
    assert loaded.config == model.config
    x = torch.rand(1, 3, 256, 256)
    for a, b in zip(outputs(model, x), outputs(loaded, x)):
        assert torch.equal(a, b)
    _, _, meta = read_checkpoint(path)
    assert meta["note"] == "test" and meta["format"] == "cunet-optimize"


def test_authors_format_config_is_inferred(tmp_path, model):
    path = authors_style_file(tmp_path / "m.pth.tar", model, drop_counters=True)
    loaded = load_model(path)
    cfg = loaded.config
    assert (cfg.num_unets, cfg.order, cfg.num_classes, cfg.width, cfg.growth_rate, cfg.neck_size) == (
        3, 2, 4, 8, 4, 2)
    x = torch.rand(1, 3, 256, 256)
    assert torch.equal(outputs(model, x)[-1], outputs(loaded, x)[-1])


def test_wrong_landmark_count_is_named(tmp_path, model):
    path = authors_style_file(tmp_path / "m.pth.tar", model)
    with pytest.raises(CheckpointError, match=r"landmark count .* = 4 but 68"):
        load_model(path, num_classes=68)


def test_missing_key_is_named(tmp_path, model):
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    del sd["module.hg.neck_block.layers.1.conv2.weight"]
    torch.save({"state_dict": sd}, tmp_path / "m.pth.tar")
    with pytest.raises(CheckpointError, match="missing tensor 'hg.neck_block.layers.1.conv2.weight'"):
        load_model(tmp_path / "m.pth.tar")


def test_wrong_shape_is_named(tmp_path, model):
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    sd["module.hg.up_blocks.2.adapters_ahead.0.adapter_conv.weight"] = torch.zeros(8, 3, 1, 1)
    torch.save({"state_dict": sd}, tmp_path / "m.pth.tar")
    with pytest.raises(CheckpointError, match=r"'hg.up_blocks.2.adapters_ahead.0.adapter_conv.weight' has shape \[8, 3, 1, 1\]"):
        load_model(tmp_path / "m.pth.tar")


def test_unexpected_key_is_named(tmp_path, model):
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    sd["module.extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": sd}, tmp_path / "m.pth.tar")
    with pytest.raises(CheckpointError, match="unexpected tensor 'extra.weight'"):
        load_model(tmp_path / "m.pth.tar")


@pytest.mark.parametrize("suffix", [".pth.tar", ".safetensors"])
def test_truncated_file(tmp_path, model, suffix):
    path = tmp_path / f"m{suffix}"
    if suffix == ".safetensors":
        save_checkpoint(model, path)
    else:
        authors_style_file(path, model)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_model(path)


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_model(tmp_path / "notes.txt")
    torch.save({"epoch": 3}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_model(tmp_path / "other.pt")


class _Payload:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_pickled_code_is_never_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open("evil.pth.tar", "wb") as f:
        pickle.dump({"state_dict": _Payload()}, f, protocol=2)
    with pytest.raises(CheckpointError):
        load_model("evil.pth.tar")
    assert not (tmp_path / "PWNED").exists()


def test_registered_name_with_overrides_and_unknown_name():
    m = load_model("cunet-face-small", width=8, growth_rate=4, num_unets=3)
    assert m.config.num_unets == 3 and m.config.num_heads == 3 and m.config.width == 8
    with pytest.raises(CUNetError, match="unknown model 'nope'"):
        load_model("nope")


def test_cli_error_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "bad.pth").write_bytes(b"\x80\x02garbage")
    assert main(["models", "--checkpoint", str(tmp_path / "bad.pth")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bad.pth" in err and err.startswith("cunet-optimize models: error:")


def test_cli_models_lists_the_paper_configurations(capsys):
    import json

    assert main(["models", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert {"cunet-face-n8k1", "cunet-pose-n16k1", "cunet-face-small"} <= set(rows)
    face = rows["cunet-face-n8k1"]
    assert face["config"]["num_unets"] == 8 and face["config"]["num_classes"] == 68
    assert face["parameters"] == sum(p.numel() for p in load_model("cunet-face-n8k1").parameters())
    assert 5 < face["gmacs_256"] < 20
