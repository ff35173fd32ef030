"""The synthetic face data set and the .pts reader/writer."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cunet_optimize.data import synth
from cunet_optimize.data.pts import PtsError, read_pts, write_pts
from cunet_optimize.errors import CUNetError

# EVAL.md flip pairs (0-based); every other point maps to itself.
FLIP_PAIRS = [
    (0, 16), (1, 15), (2, 14), (3, 13), (4, 12), (5, 11), (6, 10), (7, 9),
    (17, 26), (18, 25), (19, 24), (20, 23), (21, 22),
    (31, 35), (32, 34),
    (36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46),
    (48, 54), (49, 53), (50, 52), (55, 59), (56, 58),
    (60, 64), (61, 63), (65, 67),
]
FLIP_PERM = np.arange(68)
for _a, _b in FLIP_PAIRS:
    FLIP_PERM[_a], FLIP_PERM[_b] = _b, _a

COUNT = 6


def mirror(points: np.ndarray, permute: bool = True) -> np.ndarray:
    """Mirror about x = 0 and (optionally) relabel left/right points."""
    out = points * [-1.0, 1.0]
    return out[FLIP_PERM] if permute else out


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "faces"
    summary = synth.write_synthetic_faces(out, COUNT, seed=1, progress=False)
    assert (summary.count, summary.train_count + summary.test_count) == (COUNT, COUNT)
    return out


# --------------------------------------------------------------------------- data set


def test_same_seed_gives_identical_files_other_seed_differs(dataset, tmp_path):
    again = tmp_path / "again"
    synth.write_synthetic_faces(again, COUNT, seed=1, progress=False)
    assert files_of(again) == files_of(dataset)

    other = tmp_path / "other"
    synth.write_synthetic_faces(other, COUNT, seed=2, progress=False)
    a, b = files_of(dataset), files_of(other)
    assert a.keys() == b.keys()
    for name in a:
        if name.endswith((".png", ".pts")):
            assert a[name] != b[name], name


def test_an_image_does_not_depend_on_the_count(dataset, tmp_path):
    fewer = tmp_path / "fewer"
    synth.write_synthetic_faces(fewer, 3, seed=1, progress=False)
    for stem in ("00000", "00001", "00002"):
        for ext in (".png", ".pts"):
            name = f"images/{stem}{ext}"
            assert (fewer / name).read_bytes() == (dataset / name).read_bytes(), name


def test_layout_split_lists_and_manifest(dataset):
    stems = [f"{i:05d}" for i in range(COUNT)]
    expected = {f"images/{s}{ext}" for s in stems for ext in (".png", ".pts")}
    expected |= {"train.txt", "test.txt", "dataset.json"}
    assert set(files_of(dataset)) == expected
    # nothing left next to it (temporary folders are renamed or removed)
    assert [p.name for p in dataset.parent.iterdir()] == [dataset.name]

    train = (dataset / "train.txt").read_text().splitlines()
    test = (dataset / "test.txt").read_text().splitlines()
    assert not set(train) & set(test)
    assert sorted(train + test) == [f"images/{s}.png" for s in stems]
    assert len(test) == round(COUNT * 0.2)

    manifest = json.loads((dataset / "dataset.json").read_text())
    assert manifest["seed"] == 1
    assert manifest["count"] == COUNT
    assert manifest["splits"] == {"train": len(train), "test": len(test)}
    assert manifest["image_size"] == 256
    assert manifest["generator"] == synth.SYNTH_GENERATOR
    assert manifest["version"] == synth.SYNTH_VERSION


def test_images_and_landmarks(dataset):
    for i in range(COUNT):
        image = Image.open(dataset / f"images/{i:05d}.png")
        assert (image.mode, image.size) == ("RGB", (256, 256))
        points = read_pts(dataset / f"images/{i:05d}.pts")
        assert points.shape == (68, 2)
        assert (points >= 0).all() and (points <= 255).all()
        # the file says what the generator drew
        np.testing.assert_allclose(points, synth.synth_face(1, i)[1], atol=1e-9)
        # face box side 40-70 % of the image (with a little slack for rounding)
        side = (points.max(0) - points.min(0)).max() / 256
        assert 0.39 <= side <= 0.71


def _edge_energy(image: Image.Image, sigma: float = 1.5) -> np.ndarray:
    """Gradient magnitude, Gaussian-blurred: peaks on edges and on thin lines alike."""
    gy, gx = np.gradient(np.asarray(image.convert("L"), dtype=np.float64))
    energy = np.hypot(gx, gy)
    r = 4
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    h, w = energy.shape
    padded = np.pad(energy, r, mode="edge")
    rows = sum(k[i] * padded[:, i : i + w] for i in range(2 * r + 1))
    return sum(k[i] * rows[i : i + h, :] for i in range(2 * r + 1))


def _bilinear(a: np.ndarray, pts: np.ndarray) -> np.ndarray:
    x = np.clip(pts[:, 0], 0, a.shape[1] - 1.001)
    y = np.clip(pts[:, 1], 0, a.shape[0] - 1.001)
    x0, y0 = x.astype(int), y.astype(int)
    fx, fy = x - x0, y - y0
    top = a[y0, x0] * (1 - fx) + a[y0, x0 + 1] * fx
    bottom = a[y0 + 1, x0] * (1 - fx) + a[y0 + 1, x0 + 1] * fx
    return top * (1 - fy) + bottom * fy


def test_landmarks_sit_on_drawn_features():
    """The landmarks are on eyelids, lips, brows and the face outline: the image's edge
    energy, sampled at the 68 points moved by (dx, dy), peaks at no shift. A drawing
    off by 1 px would peak 1 px away."""
    shifts = np.arange(-2.0, 2.01, 0.5)
    score = np.zeros((len(shifts), len(shifts)))
    for i in range(6):
        image, points = synth.synth_face(5, i)
        energy = _edge_energy(image)
        for r, dy in enumerate(shifts):
            for c, dx in enumerate(shifts):
                score[r, c] += _bilinear(energy, points + [dx, dy]).mean()
    r, c = np.unravel_index(score.argmax(), score.shape)
    assert abs(shifts[c]) <= 0.5 and abs(shifts[r]) <= 0.5, (shifts[c], shifts[r])
    centre = len(shifts) // 2
    corners = score[[0, 0, -1, -1], [0, -1, 0, -1]].mean()
    assert score[centre, centre] > 1.2 * corners  # a real peak, not a plateau


def test_refuses_non_empty_folder_unless_overwrite(tmp_path):
    out = tmp_path / "set"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CUNetError, match="not empty"):
        synth.write_synthetic_faces(out, 2, seed=0, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    synth.write_synthetic_faces(out, 2, seed=0, progress=False, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "dataset.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]

    empty = tmp_path / "empty"
    empty.mkdir()
    synth.write_synthetic_faces(empty, 2, seed=0, progress=False)
    assert (empty / "train.txt").is_file()


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    real = synth.synth_face
    calls = []

    def failing(seed, index, image_size=256):
        calls.append(index)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(seed, index, image_size)

    monkeypatch.setattr(synth, "synth_face", failing)
    with pytest.raises(KeyboardInterrupt):
        synth.write_synthetic_faces(tmp_path / "new", 5, seed=0, progress=False)
    assert list(tmp_path.iterdir()) == []

    # replacing an existing set: the old one survives an interruption
    old = tmp_path / "old"
    old.mkdir()
    (old / "keep.txt").write_text("mine")
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        synth.write_synthetic_faces(old, 5, seed=0, progress=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    assert (old / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(count=1), "count"),
        (dict(count=4, test_fraction=0.0), "test fraction"),
        (dict(count=4, test_fraction=1.0), "test fraction"),
        (dict(count=4, seed=-1), "seed"),
        (dict(count=4, image_size=32), "image size"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    args = dict(seed=0, progress=False) | kwargs
    with pytest.raises(CUNetError, match=match):
        synth.write_synthetic_faces(tmp_path / "x", **args)
    assert not (tmp_path / "x").exists()


def test_cli_writes_and_reports(tmp_path, capsys):
    from cunet_optimize.cli import main

    out = tmp_path / "cli"
    assert main(["data", "synth", "--out", str(out), "--count", "3", "--seed", "4", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["count"], report["train_count"] + report["test_count"], report["seed"]) == (3, 3, 4)
    assert Path(report["out_dir"]) == out and (out / "images" / "00002.pts").is_file()
    # a second run into the same folder is a user error (exit 2), not a traceback
    assert main(["data", "synth", "--out", str(out), "--count", "3"]) == 2
    assert "not empty" in capsys.readouterr().err


# --------------------------------------------------------------------------- face model


def test_mean_shape_is_symmetric_under_the_flip_permutation():
    shape = synth.canonical_face_shape()
    np.testing.assert_allclose(mirror(shape), shape, atol=1e-12)
    # ...and only thanks to the permutation: the left/right points are where iBUG puts them
    assert np.abs(mirror(shape, permute=False) - shape).max() > 0.5
    assert shape[0, 0] < shape[8, 0] < shape[16, 0]  # jaw from the viewer's left
    assert shape[36, 0] < shape[39, 0] < shape[42, 0] < shape[45, 0]  # eye corners left to right
    assert shape[48, 0] < shape[51, 0] < shape[54, 0]
    assert shape[19, 1] < shape[37, 1] < shape[30, 1] < shape[51, 1] < shape[57, 1] < shape[8, 1]


def test_a_mirrored_face_is_the_face_with_mirrored_pose():
    """Mirror a posed face and relabel it: you get the face whose yaw and roll are negated
    (and whose individual quirks are mirrored), i.e. a plausible face of the same model."""
    rng = np.random.default_rng(0)
    for _ in range(5):
        p = synth.sample_face_params(rng)
        twin = dataclasses.replace(p, yaw=-p.yaw, roll=-p.roll, jitter=mirror(p.jitter))
        np.testing.assert_allclose(mirror(synth.face_landmarks(p)), synth.face_landmarks(twin), atol=1e-9)


# --------------------------------------------------------------------------- .pts


def test_pts_round_trip_and_one_based_files(tmp_path):
    points = np.random.default_rng(0).uniform(-3.0, 300.0, size=(68, 2))
    write_pts(tmp_path / "a.pts", points)
    np.testing.assert_allclose(read_pts(tmp_path / "a.pts"), points, rtol=0, atol=1e-9)

    write_pts(tmp_path / "b.pts", np.array([[0.0, 0.0], [9.5, 19.0]]))
    lines = (tmp_path / "b.pts").read_text().splitlines()
    assert lines[:3] == ["version: 1", "n_points: 2", "{"] and lines[-1] == "}"
    assert [tuple(map(float, line.split())) for line in lines[3:5]] == [(1.0, 1.0), (10.5, 20.0)]

    (tmp_path / "c.pts").write_text("version: 1\nn_points:  2\n{\n1 1\n  10.5 20 \n}\n\n")
    np.testing.assert_array_equal(read_pts(tmp_path / "c.pts"), [[0.0, 0.0], [9.5, 19.0]])


@pytest.mark.parametrize(
    "text, line",
    [
        ("", 1),
        ("version: 1\nn_points: 2\n1 1\n2 2\n}\n", 3),  # no '{'
        ("version: 1\nn_points: 2\n{\n1 1\n2 2\n", 5),  # no '}'
        ("version: 1\nn_points: 3\n{\n1 1\n2 2\n}\n", 6),  # fewer points than n_points
        ("version: 1\nn_points: 2\n{\n1 1\nx 2\n}\n", 5),  # not a number
        ("version: 1\nn_points: 2\n{\n1 1\n2 2 2\n}\n", 5),  # three numbers
        ("version: 1\n{\n1 1\n}\n", 2),  # no n_points
        ("version: 1\nn_points: two\n{\n1 1\n}\n", 2),
    ],
)
def test_malformed_pts_names_file_and_line(tmp_path, text, line):
    path = tmp_path / "face.pts"
    path.write_text(text)
    with pytest.raises(PtsError, match=rf"face\.pts:{line}:"):
        read_pts(path)


def test_missing_pts_file_is_a_pts_error(tmp_path):
    with pytest.raises(PtsError, match="nothing.pts"):
        read_pts(tmp_path / "nothing.pts")
