"""Loader: batch layout, seeded shuffling and augmentation, per-process shards, eval order."""

import numpy as np
import pytest

from vfm_align.data.augment import AugmentConfig, _inplane_affine, augment, crop_or_pad
from vfm_align.data.cache import PreprocessCache, Recipe
from vfm_align.data.cohort import read_manifest
from vfm_align.data.loader import Loader
from vfm_align.data.phantom import make_phantom
from vfm_align.data.tasks import get_task
from vfm_align.errors import DataError

SHAPE = (16, 48, 48)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    manifest = make_phantom(root / "ph", 10, shape=SHAPE, seed=5, workers=1, progress=False)
    cohort = read_manifest(manifest)
    cache = PreprocessCache(root / "cache", Recipe())
    cohort = cache.build(cohort)
    return cohort, cache


def _loader(setup, task="segmentation", **kw):
    cohort, cache = setup
    kw.setdefault("process_index", 0)
    kw.setdefault("process_count", 1)
    return Loader(cohort.cases, cache, get_task(task), batch_size=kw.pop("batch_size", 3), **kw)


def _ids(loader, epoch=0):
    return [cid for b in loader.epoch(epoch) for cid in b["case_id"].tolist()]


def test_batch_layout(setup):
    b = next(_loader(setup, "distortion_correction").epoch(0))
    assert b["image"].shape == (3,) + SHAPE + (3,) and b["image"].dtype == np.float32
    assert b["target"].shape == (3,) + SHAPE + (2,)
    assert b["gland"].shape == (3,) + SHAPE and b["gland"].dtype == np.int32
    assert b["case_id"].shape == (3,)
    c = next(_loader(setup, "classification").epoch(0))
    assert c["target"].shape == (3,) and set(c["target"].tolist()) <= {0, 1}


def test_seeded_shuffle_and_augmentation_are_deterministic(setup):
    a = list(_loader(setup, seed=1).epoch(0))
    b = list(_loader(setup, seed=1).epoch(0))
    assert len(a) == 3  # 10 cases, batch 3, remainder dropped when training
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    ids0 = _ids(_loader(setup, seed=1), 0)
    assert ids0 != _ids(_loader(setup, seed=1), 1)  # a new order each epoch
    assert ids0 != _ids(_loader(setup, seed=2), 0)
    full = _ids(_loader(setup, seed=1, drop_remainder=False), 0)
    assert sorted(full) == sorted(c.case_id for c in setup[0].cases)  # every case exactly once


def test_worker_processes_give_the_same_batches(setup):
    threads = list(_loader(setup, seed=4, num_threads=1).epoch(1))
    procs = list(_loader(setup, seed=4, workers=2).epoch(1))
    assert len(threads) == len(procs) == 3
    for x, y in zip(threads, procs):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def test_per_process_shards_are_disjoint_and_cover(setup):
    shards = [_ids(_loader(setup, seed=3, batch_size=1, process_index=i, process_count=2), 4) for i in range(2)]
    assert len(shards[0]) == len(shards[1]) == 5
    assert not set(shards[0]) & set(shards[1])
    assert sorted(shards[0] + shards[1]) == sorted(c.case_id for c in setup[0].cases)
    with pytest.raises(DataError, match="cannot be sharded"):
        _loader(setup, process_index=0, process_count=11)


def test_eval_mode_keeps_order_and_values(setup):
    cohort, cache = setup
    loader = _loader(setup, "classification", train=False, batch_size=4)
    batches = list(loader.epoch(0))
    assert [len(b["case_id"]) for b in batches] == [4, 4, 2]
    assert _ids(loader) == [c.case_id for c in cohort.cases]
    np.testing.assert_array_equal(batches[0]["image"][1], cache.get(cohort.cases[1])["image"])
    np.testing.assert_array_equal(batches[0]["target"], [c.labels["cspca"] for c in cohort.cases[:4]])


def test_flip_moves_image_and_masks_together(setup):
    cohort, cache = setup
    arrays = cache.get(cohort.cases[0])
    s = {**arrays, "case_id": "x"}
    only_flip = AugmentConfig(flip_p=1.0, rotate_p=0, zoom_p=0, scale_p=0, shift_p=0, noise_p=0)
    out = augment(s, np.random.default_rng(0), only_flip)
    np.testing.assert_array_equal(out["image"], arrays["image"][:, :, ::-1])
    np.testing.assert_array_equal(out["gland"], arrays["gland"][:, :, ::-1])
    np.testing.assert_array_equal(out["lesion"], arrays["lesion"][:, :, ::-1])
    # Intensity scale/shift only: a per-channel affine map of the input.
    only_int = AugmentConfig(flip_p=0, rotate_p=0, zoom_p=0, scale_p=1, shift_p=1, noise_p=0)
    o = augment(s, np.random.default_rng(1), only_int)["image"]
    for c in range(3):
        slope, icpt = np.polyfit(arrays["image"][..., c].ravel(), o[..., c].ravel(), 1)
        assert 0.9 <= slope <= 1.1 and -0.1 <= icpt <= 0.1
        np.testing.assert_allclose(o[..., c], slope * arrays["image"][..., c] + icpt, atol=1e-4)


def test_inplane_rotation_by_90_degrees_is_a_rot90():
    rng = np.random.default_rng(0)
    g = rng.integers(0, 3, size=(4, 9, 9)).astype(np.uint8)
    s = {"image": g[..., None].astype(np.float32), "gland": g, "lesion": g}
    out = _inplane_affine(s, np.pi / 2, 1.0)
    assert any(np.array_equal(out["gland"], np.rot90(g, k, axes=(1, 2))) for k in (1, 3))
    np.testing.assert_allclose(out["image"][..., 0], out["gland"], atol=1e-6)


def test_inplane_affine_matches_the_3d_transform():
    from scipy import ndimage

    rng = np.random.default_rng(1)
    img = rng.normal(size=(3, 12, 10, 2)).astype(np.float32)
    g = rng.integers(0, 3, size=(3, 12, 10)).astype(np.uint8)
    out = _inplane_affine({"image": img, "gland": g, "lesion": g}, 0.2, 1.1)
    a, z = 0.2, 1.1
    mat = np.array([[1, 0, 0], [0, np.cos(a) / z, -np.sin(a) / z], [0, np.sin(a) / z, np.cos(a) / z]])
    c = np.array([1.0, 5.5, 4.5])
    ref = ndimage.affine_transform(img[..., 1], mat, c - mat @ c, order=1, mode="constant")
    np.testing.assert_allclose(out["image"][..., 1], ref, atol=1e-5)
    np.testing.assert_array_equal(out["gland"], ndimage.affine_transform(g, mat, c - mat @ c, order=0, mode="constant"))


def test_inplane_affine_of_a_flip_equals_flip_then_affine():
    rng = np.random.default_rng(2)
    img = rng.normal(size=(3, 11, 13, 2)).astype(np.float32)
    g = rng.integers(0, 3, size=(3, 11, 13)).astype(np.uint8)
    flipped = {"image": np.ascontiguousarray(img[:, :, ::-1]), "gland": np.ascontiguousarray(g[:, :, ::-1]),
               "lesion": np.ascontiguousarray(g[:, :, ::-1])}
    want = _inplane_affine(flipped, -0.15, 0.93)
    got = _inplane_affine({"image": img, "gland": g, "lesion": g}, -0.15, 0.93, flip=True)
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["gland"], want["gland"])


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("shape", [(6, 8, 9), (6, 5, 6)])  # most of the slice (sparse matrix) / a small crop (gathers)
def test_augment_with_crop_equals_augment_then_crop(seed, shape):
    """Resampling only the crop's voxels gives exactly the crop of the augmented volume (D is padded)."""
    rng = np.random.default_rng(10 + seed)
    img = rng.normal(size=(5, 14, 12, 3)).astype(np.float32)
    g = rng.integers(0, 3, size=(5, 14, 12)).astype(np.uint8)
    s = {"image": img, "gland": g, "lesion": (g == 2).astype(np.uint8), "case_id": "x"}
    cfg = AugmentConfig(flip_p=0.5, rotate_p=0.7, zoom_p=0.7, noise_p=0.0)
    got = augment(s, np.random.default_rng(seed), cfg, shape=shape)
    ref = np.random.default_rng(seed)
    full = augment(s, ref, cfg)  # same draws, then the crop's draws from the same stream
    want = crop_or_pad(full, shape, ref)
    for k in ("image", "gland", "lesion"):
        assert got[k].shape[:3] == shape
        np.testing.assert_allclose(got[k], want[k], atol=1e-6, err_msg=k)


def test_crop_or_pad():
    s = {"image": np.ones((4, 6, 6, 3), np.float32), "gland": np.ones((4, 6, 6), np.uint8),
         "lesion": np.zeros((4, 6, 6), np.uint8)}
    out = crop_or_pad(s, (6, 4, 6))
    assert out["image"].shape == (6, 4, 6, 3) and out["gland"].shape == (6, 4, 6)
    assert out["gland"][0].sum() == 0 and out["gland"][1:5].all()  # padded one slice each side
    vals = np.arange(4 * 6 * 6, dtype=np.float32).reshape(4, 6, 6)
    s = {"image": vals[..., None], "gland": np.ones((4, 6, 6), np.uint8), "lesion": np.zeros((4, 6, 6), np.uint8)}
    offsets = set()
    for seed in range(12):
        r = crop_or_pad(s, (4, 4, 4), np.random.default_rng(seed))
        i, j = divmod(int(r["image"][0, 0, 0, 0]) % 36, 6)  # the window's corner in the source
        np.testing.assert_array_equal(r["image"][..., 0], vals[:, i:i + 4, j:j + 4])
        offsets.add((i, j))
    assert len(offsets) > 1 and all(0 <= i <= 2 and 0 <= j <= 2 for i, j in offsets)
