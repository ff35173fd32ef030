"""Crop geometry, heatmap coding and the 300-W / MPII loaders on tiny data made in tmp_path."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from cunet_optimize.data.face300w import DataError, Face300W
from cunet_optimize.data.mpii import MPIIDataset
from cunet_optimize.data.pts import read_pts, write_pts
from cunet_optimize.data.transforms import (
    FACE68_FLIP_PERM,
    MPII_FLIP_PERM,
    Augmentation,
    apply_affine,
    crop_sample,
    crop_transform,
    decode_heatmaps,
    detector_box_crop,
    encode_heatmaps,
    heatmap_to_image_coords,
    invert_affine,
    random_augment,
    tight_box_crop,
    warp_image,
)

IMG_W, IMG_H = 180, 150


# ----------------------------------------------------------------------------- helpers


def _landmarks(rng: np.random.Generator, n: int = 68) -> np.ndarray:
    """Sub-pixel points spread over the middle of a 180x150 image."""
    return rng.uniform((40.3, 30.7), (140.9, 120.2), size=(n, 2))


def _write_face(folder, stem, rng, n=68, ext=".png"):
    folder.mkdir(parents=True, exist_ok=True)
    image = rng.integers(0, 256, size=(IMG_H, IMG_W, 3), dtype=np.uint8)
    Image.fromarray(image).save(folder / f"{stem}{ext}")
    pts = _landmarks(rng, n)
    write_pts(folder / f"{stem}.pts", pts)
    return folder / f"{stem}{ext}", pts


@pytest.fixture
def face_root(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "faces"
    _write_face(root / "lfpw", "a", rng)
    _write_face(root / "helen", "b", rng, ext=".jpg")
    _write_face(root / "ibug", "c", rng)
    return root


def _recovered(item) -> np.ndarray:
    """Landmarks decoded from the item's own heatmaps, mapped back to original-image pixels."""
    pts64 = decode_heatmaps(item["heatmaps"][None])[0]
    return heatmap_to_image_coords(pts64, item["transform"].numpy())


# --------------------------------------------------------------------- flip permutations


def test_flip_permutations_are_involutions_and_swap_the_eyes():
    for perm, n in ((FACE68_FLIP_PERM, 68), (MPII_FLIP_PERM, 16)):
        np.testing.assert_array_equal(perm[perm], np.arange(n))
    # left-eye points 36-41 land on right-eye points 42-47 (and back); outer corners 36 <-> 45
    assert sorted(FACE68_FLIP_PERM[36:42]) == list(range(42, 48))
    assert FACE68_FLIP_PERM[36] == 45 and FACE68_FLIP_PERM[39] == 42
    fixed = [8, 27, 28, 29, 30, 33, 51, 57, 62, 66]
    assert [i for i in range(68) if FACE68_FLIP_PERM[i] == i] == fixed
    assert MPII_FLIP_PERM[0] == 5 and MPII_FLIP_PERM[10] == 15  # r_ankle <-> l_ankle, r_wrist <-> l_wrist


# ------------------------------------------------------------------------- crop geometry


def test_crop_transform_centre_edges_and_rotation_direction():
    A = crop_transform((100.0, 80.0), 0.5, 0.0, 256)  # covers 100 px -> 2.56x zoom
    np.testing.assert_allclose(apply_affine(np.array([100.0, 80.0]), A), [127.5, 127.5])
    # the right edge of the covered region (centre + 50 px) is the right edge of the crop (255.5)
    np.testing.assert_allclose(apply_affine(np.array([150.0, 80.0]), A), [255.5, 127.5])
    # +90 degrees turns the content counter-clockwise on screen: a point right of the centre goes up
    R = crop_transform((100.0, 80.0), 0.5, 90.0, 256)
    np.testing.assert_allclose(apply_affine(np.array([110.0, 80.0]), R), [127.5, 127.5 - 25.6], atol=1e-9)
    np.testing.assert_allclose(apply_affine(apply_affine(np.array([3.0, 7.0]), R), invert_affine(R)), [3.0, 7.0])


def test_warp_image_pixel_at_transformed_point():
    # a 3x3 white block centred on pixel (61, 47); zoom 4x with rotation and flip: the
    # crop's brightness centroid must sit where the affine sends (61, 47)
    image = np.zeros((100, 120, 3), dtype=np.uint8)
    image[46:49, 60:63] = 255
    for flip in (False, True):
        A = crop_transform((64.0, 45.0), 0.16, 30.0, 128, flip=flip)  # 32 px -> 128 px
        crop = warp_image(image, A, 128).astype(float)[..., 0]
        rows, cols = np.mgrid[0:128, 0:128]
        centroid = np.array([(crop * cols).sum(), (crop * rows).sum()]) / crop.sum()
        np.testing.assert_allclose(centroid, apply_affine(np.array([61.0, 47.0]), A), atol=0.1)
        assert warp_image(image, A, 128).shape == (128, 128, 3)


def test_crop_policies():
    pts = np.array([[10.0, 20.0], [90.0, 20.0], [50.0, 60.0]])  # box 80 x 40, centre (50, 40)
    center, scale = tight_box_crop(pts)
    np.testing.assert_allclose(center, [50.0, 40.0])
    assert scale == pytest.approx(80 / 200 * 1.25)
    center, scale = detector_box_crop([10, 20, 110, 70])  # 100 x 50 box
    np.testing.assert_allclose(center, [60.0, 45.0])
    assert scale == pytest.approx(100 / 200 * 1.1)


def test_random_augment_is_deterministic_and_within_the_recipe_bounds():
    draws = [random_augment(np.random.default_rng(s)) for s in range(300)]
    again = random_augment(np.random.default_rng(7))
    assert again.rotation_deg == draws[7].rotation_deg and np.array_equal(again.color_gain, draws[7].color_gain)
    scales = np.array([d.scale_factor for d in draws])
    rots = np.array([d.rotation_deg for d in draws])
    gains = np.array([d.color_gain for d in draws])
    assert scales.min() >= 2**-0.5 - 1e-12 and scales.max() <= 2**0.5 + 1e-12
    assert np.abs(rots).max() <= 60.0
    assert 0.25 < np.mean(rots != 0) < 0.55  # rotation with p = 0.4
    assert 0.35 < np.mean([d.flip for d in draws]) < 0.65
    assert gains.min() >= 0.6 and gains.max() <= 1.4


# -------------------------------------------------------------------------------- heatmaps


def test_encode_heatmaps_peak_outside_points_and_decoders():
    pts = np.array([[10.0, 20.0], [33.37, 41.81], [-3.0, 10.0], [np.nan, 5.0], [63.6, 10.0]])
    maps, mask = encode_heatmaps(pts, 64)
    assert maps.shape == (5, 64, 64) and maps.dtype == np.float32
    assert maps[0, 20, 10] == pytest.approx(1.0)  # peak 1 at the point (row y, column x)
    assert maps[0, 20, 13] == pytest.approx(np.exp(-9 / (2 * 4.5)))  # sigma^2 = 4.5 (exp(-d^2/9) of the authors)
    np.testing.assert_array_equal(mask, [True, True, False, False, False])
    assert not maps[2:].any()  # outside the map / NaN -> all-zero heatmap
    np.testing.assert_allclose(decode_heatmaps(maps[:2]), pts[:2], atol=1e-3)  # quadratic (default)
    quarter = decode_heatmaps(maps[:2], method="quarter")
    np.testing.assert_allclose(quarter[1], [33.25, 41.75])  # argmax (33, 42) + 0.25 toward the larger side
    np.testing.assert_allclose(decode_heatmaps(maps[:2], method="argmax")[1], [33.0, 42.0])
    # a peak on the map border is still refined (fit on the three inward samples)
    border, _ = encode_heatmaps(np.array([[63.3, 0.2]]), 64)
    np.testing.assert_allclose(decode_heatmaps(border), [[63.3, 0.2]], atol=1e-3)
    # network-like map with negative values: parabola on the raw values through
    # left -1, peak 1, right 0.5 -> vertex 0.5 * (-1 - 0.5) / (-1 - 2 + 0.5) = +0.3
    raw = -np.ones((1, 64, 64))
    raw[0, 10, 10], raw[0, 10, 11] = 1.0, 0.5
    np.testing.assert_allclose(decode_heatmaps(raw), [[10.3, 10.0]])
    # torch batch input, and NaN maps decode to NaN instead of a plausible point
    batch = torch.from_numpy(np.stack([maps[:2], maps[:2]]))
    batch[1, 0, 3, 3] = float("nan")
    out = decode_heatmaps(batch)
    assert out.shape == (2, 2, 2)
    assert np.isnan(out[1, 0]).all() and np.isfinite(out[1, 1]).all()


def test_flip_sample_keeps_channels_meaning_and_positions():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, size=(IMG_H, IMG_W, 3), dtype=np.uint8)
    pts = _landmarks(rng)
    center, scale = tight_box_crop(pts)
    plain = crop_sample(image, pts, center, scale)
    flipped = crop_sample(image, pts, center, scale, Augmentation(flip=True), flip_perm=FACE68_FLIP_PERM)
    # the flipped crop is the mirror image of the plain one
    np.testing.assert_allclose(flipped.image, plain.image[:, :, ::-1], atol=1.5 / 255)
    # channel 36 (left outer eye corner of the mirrored face) is the original point 45
    np.testing.assert_allclose(flipped.landmarks[36], pts[45])
    recovered = heatmap_to_image_coords(decode_heatmaps(flipped.heatmaps), flipped.transform)
    np.testing.assert_allclose(recovered, pts[FACE68_FLIP_PERM], atol=0.01)


# ----------------------------------------------------------------------------- 300-W loader


@pytest.mark.parametrize("crop", ["tight", "detector"])
def test_face_round_trip_recovers_landmarks(face_root, tmp_path, crop):
    boxes = None
    if crop == "detector":
        boxes = tmp_path / "boxes.json"
        boxes.write_text(json.dumps({"lfpw/a.png": [35, 25, 150, 130], "helen/b.jpg": [30, 20, 145, 125],
                                     "ibug/c.png": [38, 28, 148, 128]}))
    ds = Face300W(face_root, crop=crop, boxes=boxes)
    assert len(ds) == 3 and crop in ds.crop_policy
    for i in range(len(ds)):
        item = ds[i]
        assert item["image"].shape == (3, 256, 256) and item["image"].dtype == torch.float32
        assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
        assert item["heatmaps"].shape == (68, 64, 64) and item["transform"].shape == (2, 3)
        truth = read_pts(item["path"].rsplit(".", 1)[0] + ".pts")
        np.testing.assert_allclose(item["landmarks"].numpy(), truth, atol=1e-3)
        assert np.abs(_recovered(item) - truth).max() < 0.1  # full crop path, original pixels


def test_face_augmentation_deterministic_per_epoch_and_still_consistent(face_root):
    ds = Face300W(face_root, augment=True, seed=5)
    a, b = ds[1], ds[1]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["heatmaps"], b["heatmaps"])
    other = Face300W(face_root, augment=True, seed=5)
    assert torch.equal(other[1]["image"], a["image"])  # a fresh copy (e.g. a worker) agrees
    ds.set_epoch(1)
    assert not torch.equal(ds[1]["image"], a["image"])
    for epoch in range(4):  # whatever the draw (flip, rotation), heatmaps decode to the item's landmarks
        ds.set_epoch(epoch)
        item = ds[0]
        inside = item["target_mask"].numpy() > 0
        assert np.abs(_recovered(item) - item["landmarks"].numpy())[inside].max() < 0.1


def test_face_split_lists(face_root, tmp_path):
    (face_root / "train.txt").write_text("# two of three\nlfpw/a.png\nhelen/b\n")
    ds = Face300W(face_root, split="train")
    assert [p.rsplit("/", 2)[-2] for p in (ds[0]["path"], ds[1]["path"])] == ["lfpw", "helen"]
    other = tmp_path / "mine.txt"
    other.write_text("ibug/c.pts\n")
    assert len(Face300W(face_root, split=other)) == 1
    with pytest.raises(DataError, match="test.txt"):
        Face300W(face_root, split="test")
    (face_root / "common.txt").write_text("lfpw/a.png\nlfpw/gone.png\n")
    with pytest.raises(DataError, match="gone.png"):
        Face300W(face_root, split="common")
    assert len(Face300W(face_root, split="common", skip_bad=True)) == 1


def test_missing_split_of_the_default_data_cache_says_how_to_write_the_whole_set(tmp_path, monkeypatch):
    """The cache holds only the test split and the calibration slice; `qat --split train` on it
    must say which `data synth` command writes the training split, and that command must."""
    from cunet_optimize.cli import main
    from cunet_optimize.data import default_set

    monkeypatch.setenv("CUNET_OPTIMIZE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(default_set.DEFAULT_SYNTH, "count", 20)
    monkeypatch.setattr(default_set, "CALIBRATION_IMAGES", 4)
    cache = default_set.ensure_default_dataset(progress=False)
    with pytest.raises(DataError, match="no train split") as err:
        Face300W(cache, split="train")
    command = err.value.args[0].split("`")[1]
    assert command == "cunet-optimize data synth --out DIR --count 20 --seed 0 --test-fraction 0.1"
    whole = tmp_path / "whole"
    assert main([*command.replace("DIR", str(whole)).split()[1:], "--json"]) == 0
    train = Face300W(whole, split="train")
    assert len(train) == 18  # the calibration slice is the head of the training split
    assert [r.key for r in train.records[:4]] == (cache / "calib.txt").read_text().split()
    # any other folder keeps the generic message
    with pytest.raises(DataError, match="split list not found"):
        Face300W(whole, split="common")


def _bad_cases(root, rng):
    """Each bad sample next to a good one; returns {case: file the error must name}."""
    _write_face(root, "good", rng)
    cases = {}
    img, _ = _write_face(root / "nopts", "x", rng)
    (root / "nopts" / "x.pts").unlink()
    cases["no_pts"] = img
    img, _ = _write_face(root / "corrupt", "x", rng)
    img.write_bytes(img.read_bytes()[:200])  # truncated PNG
    cases["corrupt"] = img
    img, _ = _write_face(root / "jpgcut", "x", rng, ext=".jpg")
    img.write_bytes(img.read_bytes()[:-300])  # truncated JPEG (passes PIL's verify)
    cases["corrupt_jpeg"] = img
    img, _ = _write_face(root / "badpts", "x", rng)
    (root / "badpts" / "x.pts").write_text("version: 1\nn_points: 68\n{\n1 2\n}\n")
    cases["malformed_pts"] = root / "badpts" / "x.pts"
    _write_face(root / "count", "x", rng, n=5)
    cases["wrong_count"] = root / "count" / "x.pts"
    return cases


def test_each_bad_sample_raises_naming_the_file(tmp_path):
    rng = np.random.default_rng(1)
    cases = _bad_cases(tmp_path / "all", rng)
    for name, path in cases.items():
        root = tmp_path / name
        _write_face(root, "good", rng)
        sub = path.parent.name
        (root / sub).mkdir()
        for f in path.parent.iterdir():
            (root / sub / f.name).write_bytes(f.read_bytes())
        with pytest.raises(DataError, match=f"{sub}/x\\.(png|jpg|pts)"):
            Face300W(root)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no images"):
        Face300W(empty)
    with pytest.raises(DataError, match="not found"):
        Face300W(tmp_path / "missing")


def test_detector_crop_needs_a_box_per_image(face_root, tmp_path):
    boxes = tmp_path / "boxes.json"
    boxes.write_text(json.dumps({"lfpw/a.png": [35, 25, 150, 130]}))
    with pytest.raises(DataError, match="helen/b.jpg"):
        Face300W(face_root, crop="detector", boxes=boxes)
    with pytest.raises(DataError, match="needs boxes"):
        Face300W(face_root, crop="detector")


def test_skip_bad_skips_and_warns(tmp_path, caplog):
    root = tmp_path / "data"
    cases = _bad_cases(root, np.random.default_rng(2))
    with caplog.at_level(logging.WARNING, logger="cunet_optimize.data.face300w"):
        ds = Face300W(root, skip_bad=True)
    assert len(ds) == 1 and ds[0]["path"].endswith("good.png")
    for path in cases.values():
        assert str(path) in caplog.text
    assert len(ds.skipped) == len(cases)


# ----------------------------------------------------------------------------- MPII loader


def _mpii_fixture(tmp_path):
    rng = np.random.default_rng(4)
    root = tmp_path / "mpii" / "images"
    root.mkdir(parents=True)
    records = []
    for k, (valid, dataset) in enumerate([(True, "MPII"), (True, "MPII"), (False, "MPII"), (True, "LEEDS")]):
        name = f"{k:03d}.jpg"
        Image.fromarray(rng.integers(0, 256, (200, 160, 3), dtype=np.uint8)).save(root / name, quality=95)
        joints = np.concatenate([rng.uniform((50.5, 40.5), (110.5, 150.5), (16, 2)), np.ones((16, 1))], axis=1)
        joints[3, 2] = 0  # annotated but occluded: still counts
        if k == 0:
            joints[9] = (0, 0, 0)  # not annotated
        records.append(dict(img_paths=name, joint_self=joints.tolist(), objpos=[81.0, 90.0], scale_provided=0.6,
                            normalizer=40.0, isValidation=valid, dataset=dataset))
    path = tmp_path / "mpii" / "annot.json"
    path.write_text(json.dumps(records))
    return path, root, records


def test_mpii_loader_crop_rule_round_trip_and_visibility(tmp_path):
    path, root, records = _mpii_fixture(tmp_path)
    valid = MPIIDataset(path, root, split="valid")
    assert len(valid) == 2 and len(MPIIDataset(path, root, split="train")) == 1  # LEEDS record ignored
    item = valid[0]
    # crop rule in 1-based annotation pixels: centre (81, 90 + 15*0.6) -> 0-based (80, 98); side 0.6*1.25*200 = 150 px
    A = item["transform"].numpy().astype(np.float64)
    np.testing.assert_allclose(apply_affine(np.array([80.0, 98.0]), A), [127.5, 127.5], atol=1e-3)
    assert np.linalg.det(A[:, :2]) == pytest.approx((256 / 150) ** 2, rel=1e-5)
    joints = np.asarray(records[0]["joint_self"])[:, :2] - 1.0
    expected_visible = np.ones(16)
    expected_visible[9] = 0
    np.testing.assert_array_equal(item["visible"].numpy(), expected_visible)
    assert item["vis_flag"][3] == 0 and item["visible"][3] == 1
    assert item["target_mask"][9] == 0 and not item["heatmaps"][9].any()
    assert item["normalizer"].item() == 40.0 and item["head_size"].item() == pytest.approx(24.0)
    ok = expected_visible > 0
    assert np.abs(_recovered(item)[ok] - joints[ok]).max() < 0.1


def test_mpii_flip_permutes_every_joint_array(tmp_path):
    path, root, records = _mpii_fixture(tmp_path)
    ds = MPIIDataset(path, root, split="valid", augment=True, seed=0)
    flipped = None
    for epoch in range(20):
        ds.set_epoch(epoch)
        item = ds[0]
        if np.all(item["landmarks"].numpy()[0] == np.float32(np.asarray(records[0]["joint_self"])[5, :2] - 1)):
            flipped = item
            break
    assert flipped is not None, "no flip drawn in 20 epochs"
    assert flipped["visible"][MPII_FLIP_PERM[9]] == 0  # head top maps to itself; the missing joint stays missing
    np.testing.assert_array_equal(flipped["vis_flag"].numpy(), np.asarray(records[0]["joint_self"])[MPII_FLIP_PERM, 2])


def test_mpii_errors_name_the_file(tmp_path):
    path, root, _ = _mpii_fixture(tmp_path)
    (root / "001.jpg").unlink()
    with pytest.raises(DataError, match="001.jpg"):
        MPIIDataset(path, root)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"img_paths": "000.jpg"}]))
    with pytest.raises(DataError, match=r"bad\.json\[0\].*joint_self"):
        MPIIDataset(bad, root)
