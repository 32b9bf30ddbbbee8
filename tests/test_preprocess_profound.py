"""ProFound preprocessing: non-zero z-score, MONAI-style centre crop / symmetric pad, channel stacking."""

import nibabel as nib
import numpy as np
import pytest

from vfm_align.data.preprocess_profound import (
    PROFOUND_CROP,
    center_crop_pad,
    plan_center_crop_pad,
    preprocess_profound,
    stack_channels,
    zscore_nonzero,
)
from vfm_align.errors import DataError


def ref_zscore(x):
    """Independent reference: loop over channels, population std over the non-zero voxels."""
    out = x.astype(np.float64).copy()
    for c in range(x.shape[-1]):
        v = x[..., c].astype(np.float64)
        sel = v != 0
        if sel.sum() == 0:
            continue
        mu = v[sel].sum() / sel.sum()
        sd = np.sqrt(((v[sel] - mu) ** 2).sum() / sel.sum())
        out[..., c][sel] = (v[sel] - mu) / (sd if sd != 0 else 1.0)
    return out.astype(np.float32)


def ref_crop_pad(x, target):
    """Independent reference: pad every short axis symmetrically first, then take the MONAI centre window."""
    pads = [((t - n) // 2, (t - n) - (t - n) // 2) if n < t else (0, 0) for n, t in zip(x.shape[:3], target)]
    y = np.pad(x, pads + [(0, 0)] * (x.ndim - 3))
    sl = tuple(slice(n // 2 - t // 2, n // 2 - t // 2 + t) for n, t in zip(y.shape[:3], target))
    return y[sl]


def test_zscore_worked_example():
    x = np.zeros((1, 1, 4, 3), np.float32)
    x[0, 0, :, 0] = [0, 1, 2, 3]  # non-zero mean 2, population std sqrt(2/3)
    x[0, 0, :, 1] = [0, 5, 5, 5]  # zero std: shifted, not scaled
    # channel 2 all zero: untouched
    out = zscore_nonzero(x)
    s = np.sqrt(2 / 3)
    np.testing.assert_allclose(out[0, 0, :, 0], [0, -1 / s, 0, 1 / s], atol=1e-6)
    np.testing.assert_array_equal(out[0, 0, :, 1], [0, 0, 0, 0])
    np.testing.assert_array_equal(out[0, 0, :, 2], [0, 0, 0, 0])
    assert out.dtype == np.float32


def test_zscore_matches_reference_on_random_volume():
    rng = np.random.default_rng(0)
    x = (rng.normal(300, 80, (6, 7, 9, 3)) * (rng.uniform(size=(6, 7, 9, 3)) > 0.3)).astype(np.float32)
    x[..., 2] = 0.0
    x[0, 0, 0, 2] = 7.0  # a single non-zero voxel: std 0, becomes 0
    out = zscore_nonzero(x)
    np.testing.assert_allclose(out, ref_zscore(x), atol=1e-5)
    assert (out[x == 0] == 0).all()


def test_crop_pad_worked_example_odd_sizes():
    x = np.arange(5 * 10 * 9, dtype=np.float32).reshape(5, 10, 9, 1)
    out, plan = center_crop_pad(x, (8, 7, 8))
    # D 5 -> 8: pad (1, 2); H 10 -> 7: MONAI start 10//2 - 7//2 = 2; W 9 -> 8: start 4 - 4 = 0
    assert plan.crop_start == (0, 2, 0) and plan.crop_stop == (5, 9, 8)
    assert plan.pad_before == (1, 0, 0) and plan.pad_after == (2, 0, 0)
    expected = np.zeros((8, 7, 8, 1), np.float32)
    expected[1:6] = x[:, 2:9, 0:8]
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(out, ref_crop_pad(x, (8, 7, 8)))


@pytest.mark.parametrize("shape", [(99, 420, 420), (82, 399, 399), (40, 230, 180), (64, 224, 224), (3, 5, 7)])
def test_crop_pad_matches_reference_for_many_shapes(shape):
    rng = np.random.default_rng(sum(shape))
    x = rng.normal(size=shape + (2,)).astype(np.float32)
    out, plan = center_crop_pad(x, PROFOUND_CROP)
    assert out.shape == PROFOUND_CROP + (2,)
    np.testing.assert_array_equal(out, ref_crop_pad(x, PROFOUND_CROP))
    # invert puts the crop back where it came from and zeros elsewhere
    back = plan.invert(out)
    inside = np.zeros(shape, bool)
    inside[tuple(slice(a, b) for a, b in zip(plan.crop_start, plan.crop_stop))] = True
    np.testing.assert_array_equal(back[inside], x[inside])
    assert (back[~inside] == 0).all()


def test_crop_plan_errors():
    plan = plan_center_crop_pad((10, 10, 10), (4, 4, 4))
    with pytest.raises(DataError, match="does not match"):
        plan.apply(np.zeros((9, 10, 10)))
    with pytest.raises(DataError, match="crop grid"):
        plan.invert(np.zeros((5, 4, 4)))


def _write(path, data_xyz, affine):
    nib.save(nib.Nifti1Image(data_xyz, affine), str(path))
    return str(path)


@pytest.fixture
def case(tmp_path):
    rng = np.random.default_rng(1)
    aff = np.diag([-0.5, -0.5, 1.0, 1.0])
    shape_xyz = (30, 26, 9)  # (x, y, z) on disk -> (D, H, W) = (9, 26, 30)
    vols = {n: (rng.uniform(0, 1000, shape_xyz) * (rng.uniform(size=shape_xyz) > 0.2)).astype(np.uint16)
            for n in ("t2w", "dwi", "adc")}
    paths = {n: _write(tmp_path / f"{n}.nii.gz", v, aff) for n, v in vols.items()}
    return paths, vols, aff, tmp_path


def test_stack_channels_order_and_layout(case):
    paths, vols, _, _ = case
    image, ref = stack_channels(paths["t2w"], paths["dwi"], paths["adc"])
    assert image.shape == (9, 26, 30, 3) and image.dtype == np.float32
    for i, n in enumerate(("t2w", "dwi", "adc")):
        np.testing.assert_array_equal(image[..., i], vols[n].transpose(2, 1, 0).astype(np.float32))
    t2_only, _ = stack_channels(paths["t2w"])
    assert (t2_only[..., 1:] == 0).all()
    np.testing.assert_array_equal(t2_only[..., 0], image[..., 0])


def test_stack_channels_rejects_other_grids(case):
    paths, vols, aff, tmp = case
    bad_shape = _write(tmp / "dwi_small.nii.gz", vols["dwi"][:, :, :8], aff)
    with pytest.raises(DataError, match=r"dwi_small\.nii\.gz.*t2w\.nii\.gz"):
        stack_channels(paths["t2w"], bad_shape, paths["adc"])
    shifted = aff.copy()
    shifted[0, 3] = 4.0
    bad_aff = _write(tmp / "adc_shifted.nii.gz", vols["adc"], shifted)
    with pytest.raises(DataError, match=r"adc_shifted\.nii\.gz.*affine"):
        stack_channels(paths["t2w"], paths["dwi"], bad_aff)
    with pytest.raises(DataError, match="both DWI and ADC"):
        stack_channels(paths["t2w"], paths["dwi"])


def test_preprocess_profound_end_to_end(case):
    paths, vols, aff, _ = case
    stacked = np.stack([vols[n].transpose(2, 1, 0).astype(np.float32) for n in ("t2w", "dwi", "adc")], -1)
    expected = ref_crop_pad(ref_zscore(stacked), (8, 20, 32))  # normalise on the full volume, then crop
    got = preprocess_profound(paths["t2w"], paths["dwi"], paths["adc"], target=(8, 20, 32))
    assert got.image.shape == (8, 20, 32, 3) and got.image.flags.c_contiguous
    np.testing.assert_allclose(got.image, expected, atol=1e-5)
    np.testing.assert_array_equal(got.affine, aff)
    whole = preprocess_profound(paths["t2w"], paths["dwi"], paths["adc"], crop=False)
    assert whole.crop is None
    np.testing.assert_allclose(whole.image, ref_zscore(stacked), atol=1e-5)
