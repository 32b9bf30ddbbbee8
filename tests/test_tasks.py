"""The five tasks' (input, target) pairs and the metrics, against worked examples and numpy references."""

import numpy as np
import pytest
from scipy import ndimage

from vfm_align.data import metrics as M
from vfm_align.data.phantom import PhantomConfig, case_rng, render_case, sample_case_spec
from vfm_align.data.tasks import HEADS, KINDS, TASKS, get_task, susceptibility_field, thick_slices, warp_along_h
from vfm_align.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def sample():
    cfg = PhantomConfig()
    spec = sample_case_spec(case_rng(21, 0))
    spec["lesions"] = [{"grade": 1, "zone": "tz", "pick": 0.3, "radii": [5.0, 4.0, 4.0]},
                       {"grade": 4, "zone": "pz", "pick": 0.6, "radii": [6.0, 5.0, 5.0]}]
    v = render_case(spec, cfg)
    img = np.stack([v["t2w"], v["dwi"], v["adc"]], -1)
    img = (img - img.mean((0, 1, 2))) / img.std((0, 1, 2))
    return {"image": img, "gland": v["gland"], "lesion": v["lesion"], "labels": {"cspca": 1, "grade": 4},
            "case_id": "case-a", "spacing": cfg.spacing}


def test_registry():
    for name in TASKS:
        t = get_task(name)
        assert t.name == name and t.kind in KINDS and t.num_outputs >= 1 and t.higher_is_better
    assert get_task("classification", label="grade").num_outputs == 6
    with pytest.raises(ConfigError, match="unknown task"):
        get_task("registration")
    with pytest.raises(ConfigError, match="bad option"):
        get_task("segmentation", factor=2)
    assert get_task("classification", label="grade", seed=3).seed == 3  # the grade default keeps other options


def test_each_task_is_defined_once_with_what_other_layers_read():
    from vfm_align.train.losses import LOSSES

    want = {  # name: (head, loss, outputs, primary, ceiling, restore_from), as the papers' engines and metrics
        "classification": ("label", "ce", 2, "auroc", 1.0, None),
        "segmentation": ("dense", "dice_ce", 3, "dice_mean", 1.0, None),
        "detection": ("dense", "dice_ce", 2, "picai_score", 1.0, None),
        "super_resolution": ("restore", "l2", 1, "ssim", 1.0, 0),
        "distortion_correction": ("restore", "l2", 2, "ncc", 1.0, 1),
    }
    for name in TASKS:
        t = get_task(name, seed=5)
        assert (t.head, t.loss, t.num_outputs, t.primary, t.ceiling, t.restore_from) == want[name]
        assert t.head in HEADS and t.loss in LOSSES and t.higher_is_better and t.seed == 5
        if t.head == "restore":  # the corrected channels are the target's: T2w, or [DWI, ADC]
            assert t.restore_from + t.num_outputs <= 3


def test_predictions_from_raw_outputs():
    logits = np.array([[0.0, np.log(3.0)], [np.log(4.0), 0.0]], np.float32)
    np.testing.assert_allclose(get_task("classification").predictions(logits), [[0.25, 0.75], [0.8, 0.2]], rtol=1e-6)
    vox = np.zeros((1, 2, 1, 1, 3), np.float32)
    vox[0, 0, 0, 0, 2] = vox[0, 1, 0, 0, 1] = 5.0
    np.testing.assert_array_equal(get_task("segmentation").predictions(vox), [[[[2]], [[1]]]])
    det = get_task("detection").predictions(np.stack([np.zeros((2, 2)), np.log([[1.0, 3.0], [9.0, 1.0]])], -1))
    np.testing.assert_allclose(det, [[0.5, 0.75], [0.9, 0.5]], rtol=1e-6)  # the lesion channel's probability
    vol = np.arange(6, dtype=np.float32).reshape(1, 1, 2, 3, 1)
    np.testing.assert_array_equal(get_task("super_resolution").predictions(vol), vol)


def test_label_tasks(sample):
    x, y = get_task("classification").make(sample)
    assert x.shape == sample["image"].shape and y == 1
    assert get_task("classification", label="grade").make(sample)[1] == 4
    with pytest.raises(DataError, match="case-a.*'grade'"):
        get_task("classification", label="grade").make({**sample, "labels": {"cspca": 1}})
    _, seg = get_task("segmentation").make(sample)
    np.testing.assert_array_equal(seg, sample["gland"])
    _, det = get_task("detection").make(sample)
    # Only the ISUP >= 2 lesion is a detection target; the grade-1 lesion is background.
    np.testing.assert_array_equal(det, (sample["lesion"] >= 2).astype(np.int32))
    assert det.sum() > 0 and (sample["lesion"] == 1).sum() > 0
    binary = get_task("detection", lesion_mask="binary")
    _, det01 = binary.make({**sample, "lesion": (sample["lesion"] > 0).astype(np.uint8)})
    np.testing.assert_array_equal(det01, sample["lesion"] > 0)
    with pytest.raises(DataError, match="case-a.*binary"):
        binary.make(sample)
    # A graded mask whose only lesion is ISUP 1 has no detection target.
    _, none = get_task("detection").make({**sample, "lesion": (sample["lesion"] == 1).astype(np.uint8)})
    assert none.sum() == 0


def test_super_resolution_input_is_the_slice_average(sample):
    task = get_task("super_resolution")
    x, y = task.make(sample)
    thin = sample["image"][..., 0]
    np.testing.assert_array_equal(y[..., 0], thin)
    ref = thin.reshape(16, 2, 96, 96).mean(1, dtype=np.float64).astype(np.float32).repeat(2, axis=0)
    np.testing.assert_array_equal(x[..., 0], ref)
    np.testing.assert_array_equal(x[..., 1:], sample["image"][..., 1:])
    # Odd depth with factor 3: the last group averages the remaining slices.
    v = np.arange(7 * 2 * 2, dtype=np.float32).reshape(7, 2, 2)
    t = thick_slices(v, 3)
    np.testing.assert_array_equal(t[6], v[6])
    np.testing.assert_allclose(t[0], v[:3].mean(0))
    # The degradation is material but not destructive inside the gland (stated band 17-32 dB).
    p = M.psnr(x[..., 0], y[..., 0], sample["gland"] > 0)
    assert 17.0 < p < 32.0, p


def test_distortion_field_range_and_smoothness(sample):
    sp = sample["spacing"]
    for seed in range(5):
        d = susceptibility_field((32, 96, 96), sp, np.random.default_rng(seed))
        peak_mm = np.abs(d).max() * sp[1]
        assert 2.0 - 1e-4 <= peak_mm <= 5.0 + 1e-4
        # Smooth and fold-free: the warp along H stays monotonic (|dd/dy| < 0.5 voxel/voxel), and
        # second differences are tiny.
        assert np.abs(np.diff(d, axis=1)).max() < 0.5
        assert np.abs(np.diff(d, n=2, axis=1)).max() < 0.05
        assert np.abs(np.diff(d, n=2, axis=2)).max() < 0.05


def test_warp_along_h_is_the_intended_shift():
    ramp = np.broadcast_to(np.arange(40, dtype=np.float32)[None, :, None], (3, 40, 5)).copy()
    disp = np.full(ramp.shape, 1.25, np.float32)
    out = warp_along_h(ramp, disp)
    np.testing.assert_allclose(out[:, 2:], ramp[:, 2:] - 1.25, atol=1e-5)  # pull: out(y) = in(y - d)


def test_distortion_task_pairs(sample):
    task = get_task("distortion_correction", seed=3)
    x, y = task.make(sample)
    x2, _ = task.make(sample)
    np.testing.assert_array_equal(x, x2)  # fixed per case and seed
    np.testing.assert_array_equal(x[..., 0], sample["image"][..., 0])  # T2w untouched
    np.testing.assert_array_equal(y, sample["image"][..., 1:3])
    d = task.field(sample)
    ref = ndimage.map_coordinates(sample["image"][..., 1], np.mgrid[:32, :96, :96] - np.stack([0 * d, d, 0 * d]),
                                  order=1, mode="nearest")
    np.testing.assert_allclose(x[..., 1], ref, atol=1e-5)
    other = get_task("distortion_correction", seed=4).field(sample)
    assert not np.allclose(d, other)
    assert M.ncc(x[..., 1], y[..., 0], sample["gland"] > 0) < 0.999


def test_auroc_and_balanced_accuracy_worked_examples():
    assert M.auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.75)
    # A tie between a positive and a negative counts one half: (0.5 + 1 + 1 + 1) / 4.
    assert M.auroc([0.5, 0.5, 0.2, 0.9], [1, 0, 0, 1]) == pytest.approx(0.875)
    assert np.isnan(M.auroc([0.1, 0.2], [1, 1]))
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.3, 0.6], [0.4, 0.4, 0.2]])
    y = np.array([0, 1, 2, 1])
    # class 0 vs rest: 0.7 > all three -> 1; class 1: pos {.5,.4} vs neg {.2,.3}: 1; class 2: .6 > all -> 1
    assert M.macro_auroc(probs, y) == pytest.approx(1.0)
    probs[3] = [0.1, 0.2, 0.7]
    # class 0: 1; class 1: pos {.5, .2} vs neg {.2, .3}: (1 + 1 + 0.5 + 0) / 4; class 2: .6 beats .1, .3, not .7
    assert M.macro_auroc(probs, y) == pytest.approx((1.0 + 0.625 + 2 / 3) / 3)
    assert M.balanced_accuracy([0, 0, 1, 1, 1], [0, 1, 1, 1, 0]) == pytest.approx((0.5 + 2 / 3) / 2)


def test_dice_psnr_ncc_worked_examples():
    pred = np.array([0, 1, 1, 2, 2, 0])
    tgt = np.array([0, 1, 2, 2, 2, 1])
    d = M.dice_per_class(pred, tgt, (1, 2, 3))
    assert d[1] == pytest.approx(2 * 1 / (2 + 2)) and d[2] == pytest.approx(2 * 2 / (2 + 3)) and np.isnan(d[3])
    t = np.array([0.0, 1.0, 2.0, 3.0, 99.0])
    p = t + np.array([0.1, -0.1, 0.1, -0.1, 50.0])
    mask = np.array([1, 1, 1, 1, 0], bool)  # the outlier lies outside the mask
    assert M.psnr(p, t, mask) == pytest.approx(10 * np.log10(9 / 0.01))
    assert M.ncc(2 * t + 1, t, mask) == pytest.approx(1.0)
    assert M.ncc(-t, t, mask) == pytest.approx(-1.0)


def test_ssim_against_a_direct_window_sum():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(13, 13, 13))
    y = 0.6 * x + 0.4 * rng.normal(size=x.shape)
    r = 4.0
    smap = M.ssim_map(x, y, r)
    # Direct: explicit normalised Gaussian weights (sigma 1.5, radius int(3.5*1.5+0.5)=5) at the centre.
    ax = np.arange(-5, 6)
    g = np.exp(-0.5 * (ax / 1.5) ** 2)
    g /= g.sum()
    w = g[:, None, None] * g[None, :, None] * g[None, None, :]
    px, py = x[1:12, 1:12, 1:12], y[1:12, 1:12, 1:12]
    mx, my = (w * px).sum(), (w * py).sum()
    vx, vy = (w * px * px).sum() - mx**2, (w * py * py).sum() - my**2
    cxy = (w * px * py).sum() - mx * my
    c1, c2 = (0.01 * r) ** 2, (0.03 * r) ** 2
    ref = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    assert smap[6, 6, 6] == pytest.approx(ref, rel=1e-10)
    mask = np.ones(x.shape, bool)
    assert M.ssim(x, x, mask) == pytest.approx(1.0)
    # Constant images: SSIM reduces to the luminance term (2ab + C1) / (a^2 + b^2 + C1).
    a, b = np.full((8, 8, 8), 2.0), np.full((8, 8, 8), 3.0)
    assert M.ssim(a, b, np.ones_like(a, bool), data_range=1.0) == pytest.approx((12 + 1e-4) / (13 + 1e-4))


def test_picai_detection_worked_example():
    shape = (8, 16, 16)
    gt = [np.zeros(shape, np.int32) for _ in range(3)]
    det = [np.zeros(shape, np.float32) for _ in range(3)]
    gt[0][2:5, 2:6, 2:6] = 1
    det[0][2:5, 2:6, 2:6] = 0.9  # true positive
    det[1][3:6, 8:12, 8:12] = 0.6  # false positive in a case without lesion
    gt[2][1:4, 9:13, 3:7] = 1
    det[2][1:4, 9:13, 3:7] = 0.3  # true positive, low confidence
    res = M.picai_detection(det, gt, extract=False)
    # Lesion PR points (by confidence): (P=1, R=.5), (P=.5, R=.5), (P=2/3, R=1): AP = .5*1 + .5*2/3.
    assert res["ap"] == pytest.approx(0.5 + 0.5 * 2 / 3)
    # Cases: positives scored .9 and .3, the negative .6 -> AUROC 1/2.
    assert res["auroc"] == pytest.approx(0.5)
    assert res["picai_score"] == pytest.approx((res["ap"] + 0.5) / 2)


def test_task_evaluate_on_perfect_predictions(sample):
    g = [sample["gland"]]
    seg = get_task("segmentation")
    assert seg.evaluate([sample["gland"]], [sample["gland"]])["dice_mean"] == 1.0
    sr = get_task("super_resolution")
    _, y = sr.make(sample)
    res = sr.evaluate([y], [y], g)
    assert res["ssim"] == pytest.approx(1.0) and res["ncc"] == pytest.approx(1.0) and res["psnr"] == np.inf
    noisy = sr.evaluate([y + np.random.default_rng(0).normal(0, 0.1, y.shape)], [y], g)
    assert noisy["ssim"] < 0.99 and noisy["psnr"] < 40 and sr.primary in noisy
    dc = get_task("distortion_correction")
    x, y = dc.make(sample)
    better = dc.evaluate([y], [y], g)["ncc"]
    worse = dc.evaluate([x[..., 1:3]], [y], g)["ncc"]
    assert better == pytest.approx(1.0) and worse < better
    cls = get_task("classification")
    res = cls.evaluate(np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]]), [0, 1, 1])
    assert res["auroc"] == pytest.approx(1.0) and res["balanced_accuracy"] == pytest.approx(0.75)
    det = get_task("detection")
    _, tgt = det.make(sample)
    like = ndimage.gaussian_filter(tgt.astype(np.float32), 1.0)  # a smooth, well-placed likelihood
    res = det.evaluate([like / like.max(), np.zeros_like(like)], [tgt, np.zeros_like(tgt)])
    assert res["ap"] == pytest.approx(1.0) and res["auroc"] == pytest.approx(1.0)
