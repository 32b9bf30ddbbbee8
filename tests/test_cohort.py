"""Manifest reading, per-case validation, geometry and the preprocessing cache, on tiny hand-made NIfTI files."""

import csv
import json
import os

import nibabel as nib
import numpy as np
import pytest

from vfm_align.data.cache import PreprocessCache, Recipe, preprocess_case, zscore_nonzero
from vfm_align.data.cohort import load_case, read_manifest
from vfm_align.data.nifti import load_volume
from vfm_align.data.resample import resample_to_spacing, to_canonical
from vfm_align.errors import DataError

SHAPE = (6, 10, 12)  # (D, H, W)
AFF = np.diag([0.8, 0.8, 3.0, 1.0])


def _write(path, data_dhw, affine=AFF, dtype=np.float32):
    img = nib.Nifti1Image(np.asarray(data_dhw, dtype).transpose(2, 1, 0), affine)
    nib.save(img, str(path))
    return path.name


def _case(root, cid, rng, *, gland=None, affine=AFF):
    d = root / cid
    d.mkdir()
    row = {"case_id": cid, "split": "train"}
    for name in ("t2w", "adc", "dwi"):
        row[name] = f"{cid}/" + _write(d / f"{name}.nii.gz", rng.uniform(1, 100, SHAPE), affine)
    g = np.zeros(SHAPE) if gland is None else gland
    if gland is None:
        g[2:4, 3:7, 4:8] = 1
        g[2:4, 7:9, 4:8] = 2
    row["gland"] = f"{cid}/" + _write(d / "gland.nii.gz", g, affine, np.uint8)
    row["cspca"] = 1
    return row


def _manifest(root, rows, name="manifest.csv"):
    path = root / name
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    return path


@pytest.fixture
def cohort_dir(tmp_path):
    rng = np.random.default_rng(0)
    rows = [_case(tmp_path, f"c{i}", rng) for i in range(3)]
    return tmp_path, rows


def test_reads_a_good_manifest_csv_and_json(cohort_dir):
    root, rows = cohort_dir
    c = read_manifest(_manifest(root, rows))
    assert [x.case_id for x in c.cases] == ["c0", "c1", "c2"]
    assert c.cases[0].labels == {"cspca": 1}
    assert os.path.isabs(c.cases[0].paths["t2w"])
    (root / "m.json").write_text(json.dumps({"cases": rows, "classes": {"cspca": [0, 1, 2]}}))
    cj = read_manifest(root / "m.json")
    assert [x.paths for x in cj.cases] == [x.paths for x in c.cases]
    assert cj.classes["cspca"] == (0, 1, 2)
    vols = load_case(c.cases[0])
    assert vols["t2w"].data.shape == SHAPE and vols["gland"].data.dtype == np.uint8


def test_duplicate_ids_and_missing_columns(cohort_dir):
    root, rows = cohort_dir
    with pytest.raises(DataError, match=r"duplicate case_id.*c1"):
        read_manifest(_manifest(root, rows + [dict(rows[1])]))
    with pytest.raises(DataError, match="lacks required column"):
        read_manifest(_manifest(root, [{k: v for k, v in r.items() if k != "adc"} for r in rows]))
    with pytest.raises(DataError, match="manifest not found"):
        read_manifest(root / "nope.csv")


def test_per_case_errors_name_case_and_file_and_skip_bad(cohort_dir):
    root, rows = cohort_dir
    rows[1]["adc"] = "c1/missing.nii.gz"
    rows[2]["cspca"] = 3  # outside the declared classes (0, 1)
    path = _manifest(root, rows)
    with pytest.raises(DataError) as err:
        read_manifest(path)
    msg = str(err.value)
    assert "2 bad case(s)" in msg and "'c1'" in msg and "missing.nii.gz" in msg and "cspca=3" in msg
    c = read_manifest(path, skip_bad=True)
    assert [x.case_id for x in c.cases] == ["c0"]
    assert [cid for cid, _ in c.skipped] == ["c1", "c2"]


@pytest.mark.parametrize("problem", ["truncated", "4d", "nan", "gland_label", "grid"])
def test_voxel_level_problems(cohort_dir, problem):
    root, rows = cohort_dir
    d = root / "c1"
    if problem == "truncated":
        raw = (d / "dwi.nii.gz").read_bytes()
        (d / "dwi.nii.gz").write_bytes(raw[: len(raw) // 2])
        match = r"c1.*dwi\.nii\.gz.*unreadable"
    elif problem == "4d":
        nib.save(nib.Nifti1Image(np.ones((12, 10, 6, 2), np.float32), AFF), str(d / "dwi.nii.gz"))
        match = r"c1.*dwi\.nii\.gz.*3D"
    elif problem == "nan":
        a = np.ones(SHAPE)
        a[1, 2, 3] = np.nan
        _write(d / "adc.nii.gz", a)
        match = r"c1.*adc\.nii\.gz.*1 NaN"
    elif problem == "gland_label":
        g = np.zeros(SHAPE)
        g[0, 0, 0] = 7
        _write(d / "gland.nii.gz", g, dtype=np.uint8)
        match = r"c1.*gland\.nii\.gz.*\[7\] outside"
    else:
        _write(d / "adc.nii.gz", np.ones(SHAPE), affine=np.diag([0.8, 0.8, 2.0, 1.0]))
        match = r"c1.*adc\.nii\.gz.*not on the same grid"
    cohort = read_manifest(_manifest(root, rows))
    with pytest.raises(DataError, match=match):
        load_case(cohort.cases[1])
    cache = PreprocessCache(root / "cache", Recipe())
    # By default nothing runs on half a cohort: one error listing the bad case.
    with pytest.raises(DataError, match=r"1 bad case"):
        cache.build(cohort)
    kept = cache.build(cohort, skip_bad=True)
    assert [c.case_id for c in kept.cases] == ["c0", "c2"] and kept.skipped[0][0] == "c1"


def test_canonical_reorientation_keeps_world_positions():
    data = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(SHAPE)
    aff = np.array([[-0.8, 0, 0, 10.0], [0, 0, 3.0, -5.0], [0, -0.8, 0, 7.0], [0, 0, 0, 1]])  # LIP-ish
    img = nib.Nifti1Image(data.transpose(2, 1, 0), aff)
    from vfm_align.data.nifti import Volume

    vol = Volume(data=data, affine=aff, header=img.header, path="x.nii")
    can = to_canonical(vol)
    assert nib.aff2axcodes(can.affine) == ("R", "A", "S")
    # Every voxel keeps its world position: compare values at the same world point.
    for dhw in [(0, 0, 0), (5, 9, 11), (2, 3, 4)]:
        world = aff @ np.array([dhw[2], dhw[1], dhw[0], 1.0])
        ijk = np.rint(np.linalg.solve(can.affine, world)[:3]).astype(int)
        assert can.data[ijk[2], ijk[1], ijk[0]] == data[dhw]
    ref = nib.as_closest_canonical(img)  # nibabel's own answer
    np.testing.assert_array_equal(can.data, np.asarray(ref.dataobj).transpose(2, 1, 0))
    np.testing.assert_allclose(can.affine, ref.affine)


def test_resample_to_spacing_geometry():
    from vfm_align.data.nifti import Volume

    # A linear ramp along W is reproduced exactly by linear interpolation away from the edges.
    w = np.arange(12, dtype=np.float32)
    data = np.broadcast_to(w, SHAPE).copy()
    img = nib.Nifti1Image(data.transpose(2, 1, 0), AFF)
    vol = Volume(data=data, affine=AFF, header=img.header, path="x.nii")
    out = resample_to_spacing(vol, (1.5, 0.8, 0.4))
    assert out.data.shape == (12, 10, 24)
    np.testing.assert_allclose(out.spacing, (1.5, 0.8, 0.4))
    # New voxel centre k along W sits at old index (k + 0.5) / 2 - 0.5; its world x matches.
    for k in (3, 10, 19):
        old_i = (k + 0.5) / 2 - 0.5
        np.testing.assert_allclose((out.affine @ [k, 0, 0, 1])[0], (AFF @ [old_i, 0, 0, 1])[0])
        np.testing.assert_allclose(out.data[4, 4, k], old_i, atol=1e-5)


def test_cache_is_keyed_by_recipe_and_sources(cohort_dir):
    root, rows = cohort_dir
    cohort = read_manifest(_manifest(root, rows))
    case = cohort.cases[0]
    cache = PreprocessCache(root / "cache", Recipe())
    arrays = cache.get(case)
    assert isinstance(arrays["image"], np.memmap) and arrays["image"].shape == SHAPE + (3,)
    assert arrays["image"].flags["C_CONTIGUOUS"]
    ref = np.stack([load_volume(case.paths[k]).data for k in ("t2w", "dwi", "adc")], -1)
    np.testing.assert_allclose(arrays["image"], zscore_nonzero(ref), atol=1e-6)
    np.testing.assert_allclose(arrays["image"][..., 0].mean(), 0, atol=1e-5)
    assert Recipe().key() != Recipe(spacing=(3.0, 1.6, 1.6)).key()
    other = PreprocessCache(root / "cache", Recipe(spacing=(3.0, 1.6, 1.6)))
    assert other.dir != cache.dir and other.get(case)["image"].shape == (6, 5, 6, 3)
    assert cache.is_fresh(case)
    os.utime(case.paths["dwi"], ns=(1, 1))  # a changed source invalidates the entry
    assert not cache.is_fresh(case)
    cache.get(case)
    assert cache.is_fresh(case)


def test_align_to_t2w_resamples_a_mismatched_grid(cohort_dir):
    root, rows = cohort_dir
    shifted = AFF.copy()
    shifted[0, 3] = 0.8  # ADC shifted by one voxel along x
    a = np.broadcast_to(np.arange(12, dtype=np.float32), SHAPE).copy()
    _write(root / "c0" / "adc.nii.gz", a, affine=shifted)
    case = read_manifest(_manifest(root, rows)).cases[0]
    with pytest.raises(DataError, match="same grid"):
        preprocess_case(case, Recipe(normalize="none"))
    out = preprocess_case(case, Recipe(normalize="none", align_to_t2w=True))
    # T2w voxel i sees the ADC at world x = 0.8 i, i.e. ADC index i - 1.
    np.testing.assert_allclose(out["image"][3, 5, 1:, 2], np.arange(11), atol=1e-5)
