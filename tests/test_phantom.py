"""The phantom's statistics are what make the five tasks learnable: check them, and its files."""

import json
import os

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from vfm_align.data.cohort import read_manifest
from vfm_align.data.nifti import load_volume
from vfm_align.data.phantom import (
    GRADE_P,
    NUM_LESIONS_P,
    PhantomConfig,
    case_rng,
    make_phantom,
    render_case,
    sample_case_spec,
)
from vfm_align.errors import DataError

CFG = PhantomConfig()  # the default 32x96x96 grid: statistics are checked at the shipped resolution


def _lesion_case(seed, grade, zone):
    spec = sample_case_spec(case_rng(seed, 0))
    spec["lesions"] = [{"grade": grade, "zone": zone, "pick": 0.5, "radii": [6.0, 5.0, 5.0]}]
    return render_case(spec, CFG)


def _cnr(vol, lesion, zone_mask):
    """(lesion mean - surrounding same-zone mean) / surrounding std (noise + texture + bias)."""
    ring = ndimage.binary_dilation(lesion, iterations=3) & ~ndimage.binary_dilation(lesion, iterations=1) & zone_mask
    return (vol[lesion].mean() - vol[ring].mean()) / vol[ring].std()


@pytest.fixture(scope="module")
def significant_lesions():
    grades_zones = [(2, "pz"), (3, "pz"), (4, "tz"), (5, "pz"), (3, "tz"), (4, "pz")]
    cases = [(_lesion_case(s, g, z), z) for s, (g, z) in enumerate(grades_zones)]
    return cases


def test_lesion_contrast_has_the_radiological_sign(significant_lesions):
    cnr = {k: [] for k in ("t2w", "dwi", "adc")}
    for v, zone in significant_lesions:
        les = v["lesion"] > 0
        zmask = v["gland"] == (2 if zone == "pz" else 1)
        assert les.sum() >= 20
        for k in cnr:
            cnr[k].append(_cnr(v[k], les, zmask))
    # csPCa: dark on T2w and ADC, bright on high-b DWI, clearly above the noise on average.
    assert np.mean(cnr["t2w"]) < -1.0, cnr["t2w"]
    assert np.mean(cnr["adc"]) < -1.5, cnr["adc"]
    assert np.mean(cnr["dwi"]) > 2.0, cnr["dwi"]
    assert min(cnr["dwi"]) > 1.0 and max(cnr["adc"]) < 0, cnr


def test_lesion_conspicuity_grows_with_grade():
    def dwi_cnr(grade, seed):
        v = _lesion_case(seed, grade, "pz")
        return _cnr(v["dwi"], v["lesion"] > 0, v["gland"] == 2)

    low = np.mean([dwi_cnr(1, s) for s in (11, 12)])
    high = np.mean([dwi_cnr(5, s) for s in (11, 12)])
    assert high > low + 2.0, (low, high)


def test_zone_contrast_and_masks():
    v = render_case(sample_case_spec(case_rng(3, 1)), CFG)
    tz, pz = v["gland"] == 1, v["gland"] == 2
    assert set(np.unique(v["gland"]).tolist()) == {0, 1, 2}

    def cnr(a):
        return (a[pz].mean() - a[tz].mean()) / np.sqrt(0.5 * (a[pz].var() + a[tz].var()))

    assert cnr(v["t2w"]) > 2.0  # PZ brighter than TZ on T2w
    assert cnr(v["adc"]) > 1.5  # and higher diffusivity
    # The PZ is the posterior shell: its centre of mass lies posterior (lower H) of the TZ's.
    assert np.argwhere(pz)[:, 1].mean() < np.argwhere(tz)[:, 1].mean()
    # Lesions lie inside the gland.
    assert not np.any((v["lesion"] > 0) & (v["gland"] == 0))


def test_background_noise_is_rician():
    v = render_case(sample_case_spec(case_rng(4, 2)), CFG)
    air = v["t2w"][:, :6, :6]  # outside the body: pure magnitude noise (Rayleigh)
    # Rayleigh mean/std = sqrt(pi/2) / sqrt(2 - pi/2) = 1.913; Gaussian noise would give ~0.
    assert 1.75 < air.mean() / air.std() < 2.08
    assert abs(air.mean() / (CFG.t2_noise * np.sqrt(np.pi / 2)) - 1) < 0.1


def test_case_labels_follow_lesions_and_class_balance():
    specs = [sample_case_spec(case_rng(0, i)) for i in range(3000)]
    for s in specs[:200]:
        assert s["grade"] == max([l["grade"] for l in s["lesions"]], default=0)
        assert s["cspca"] == int(s["grade"] >= 2)
    frac = np.mean([s["cspca"] for s in specs])
    p_neg = sum(p * GRADE_P[0] ** n for n, p in enumerate(NUM_LESIONS_P))  # no lesion of ISUP >= 2
    assert abs((1 - p_neg) - 0.531) < 0.01
    assert 0.45 < frac < 0.61  # expected 0.531, sd 0.009 for 3000 cases
    counts = np.bincount([len(s["lesions"]) for s in specs], minlength=4)
    np.testing.assert_allclose(counts / len(specs), NUM_LESIONS_P, atol=0.03)


def test_render_is_deterministic_per_seed():
    a = render_case(sample_case_spec(case_rng(7, 3)), CFG)
    b = render_case(sample_case_spec(case_rng(7, 3)), CFG)
    c = render_case(sample_case_spec(case_rng(8, 3)), CFG)
    for k in ("t2w", "dwi", "adc", "gland", "lesion"):
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["t2w"], c["t2w"])


def test_make_phantom_writes_a_valid_cohort(tmp_path):
    out = tmp_path / "ph"
    manifest = make_phantom(out, 6, shape=(16, 48, 48), seed=2, workers=2, progress=False)
    cohort = read_manifest(manifest)
    assert len(cohort) == 6 and {c.split for c in cohort.cases} <= {"train", "val", "test"}
    assert len(cohort.split("train")) == 4
    case = cohort.cases[0]
    t2 = load_volume(case.paths["t2w"])
    np.testing.assert_allclose(t2.spacing, PhantomConfig(shape=(16, 48, 48)).spacing)
    assert nib.aff2axcodes(t2.affine) == ("R", "A", "S")
    les = load_volume(case.paths["lesion"]).data
    assert case.labels["grade"] == les.max() and case.labels["cspca"] == int(les.max() >= 2)
    # Same case, one process: identical voxels (no dependence on worker count).
    solo = make_phantom(tmp_path / "solo", 6, shape=(16, 48, 48), seed=2, workers=1, progress=False)
    np.testing.assert_array_equal(load_volume(read_manifest(solo).cases[4].paths["dwi"]).data,
                                  load_volume(cohort.cases[4].paths["dwi"]).data)
    # Re-running the same command is a no-op; other settings into the same folder are refused.
    stamp = os.path.getmtime(manifest)
    assert make_phantom(out, 6, shape=(16, 48, 48), seed=2, workers=2, progress=False) == manifest
    assert os.path.getmtime(manifest) == stamp
    with pytest.raises(DataError, match="exists"):
        make_phantom(out, 7, shape=(16, 48, 48), seed=2, progress=False)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".phantom-tmp")]
    info = json.loads((out / "phantom.json").read_text())
    assert info["recipe"]["cases"] == 6 and len(info["cases"]) == 6


def test_cli_phantom(tmp_path, capsys):
    from vfm_align.cli import main

    assert main(["phantom", "--out", str(tmp_path / "c"), "--cases", "2", "--shape", "16,32,32",
                 "--workers", "1", "--quiet"]) == 0
    assert (tmp_path / "c" / "manifest.csv").is_file()
    assert main(["phantom", "--out", str(tmp_path / "d"), "--shape", "16,32"]) == 1
    assert "--shape" in capsys.readouterr().err
