"""A procedural, seeded prostate mpMRI phantom: the project's default cohort.

Each case is a pelvis-like field of view (subcutaneous fat, pelvic soft tissue, obturator
muscles, pubic bone, rectum with gas, bladder) around a deformed ellipsoidal prostate with a
central transition zone (TZ) and a posterior/apical peripheral zone (PZ), plus 0-3 lesions of
ISUP grade 1-5. Intensities follow the signs radiologists read:

* T2w: PZ brighter than TZ, lesions darker than their zone, urine and fat bright.
* DWI (b=1400) is computed from a b=0 signal and the ADC, ``S_b = S_0 exp(-b ADC)``, so
  lesions (low ADC) are bright and urine dark; fat is suppressed.
* ADC is *measured* from noisy b=0 and b=1400 images, as a scanner does, so its noise is
  realistic (large in air, small in tissue).

A smooth random elastic warp changes the whole anatomy per case; T2w and DWI get their own
smooth bias fields and Rician noise. The case label follows the lesions: ``cspca = 1`` when a
lesion has ISUP grade >= 2. Files are written as real NIfTI (RAS+ affine with anisotropic
spacing) plus a manifest, so the real-data path is what the phantom exercises.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import json
import multiprocessing
import os
import sys
from dataclasses import asdict, dataclass

import nibabel as nib
import numpy as np
from scipy import ndimage

from vfm_align.atomic import atomic_dir
from vfm_align.errors import DataError

B_VALUE = 1.4e-3  # s/mm^2 * 1e-6 scaling: ADC is stored in 1e-6 mm^2/s, b = 1400 s/mm^2
GRADE_CONTRAST = (0.3, 0.55, 0.7, 0.85, 1.0)  # lesion conspicuity for ISUP 1..5
# Tissue properties: (T2w signal, ADC in 1e-6 mm^2/s, b=0 signal). Values follow typical 3T ranges.
TISSUE = {
    "soft": (350.0, 1600.0, 1000.0),
    "fat": (750.0, 300.0, 60.0),  # fat-suppressed on DWI
    "muscle": (150.0, 1400.0, 700.0),
    "bone": (420.0, 450.0, 80.0),  # fatty marrow, suppressed on DWI
    "bladder": (1300.0, 2900.0, 1400.0),
    "rectum_wall": (220.0, 1300.0, 900.0),
    "gas": (15.0, 0.0, 5.0),
    "tz": (320.0, 1250.0, 1000.0),
    "pz": (620.0, 1700.0, 1000.0),
}
NUM_LESIONS_P = (0.3, 0.4, 0.2, 0.1)  # P(0, 1, 2, 3 lesions)
GRADE_P = (0.35, 0.25, 0.2, 0.1, 0.1)  # P(ISUP 1..5) per lesion -> P(csPCa) ~ 0.53


@dataclass(frozen=True)
class PhantomConfig:
    """Geometry and noise of the phantom. Spacing = fov_mm / shape, both in (D, H, W) order."""

    shape: tuple[int, int, int] = (32, 96, 96)
    fov_mm: tuple[float, float, float] = (80.0, 96.0, 96.0)
    t2_noise: float = 15.0  # Rician sigma, T2w units (T2w tissue ~ 300-700)
    dwi_noise: float = 0.012  # Rician sigma as a fraction of the b=0 scale
    dwi_scale: float = 3.0  # b=0 signal multiplier so DWI uses the uint16 range well
    bias: float = 0.15  # peak bias-field deviation
    texture: float = 0.06  # smooth tissue heterogeneity (relative)
    splits: tuple[float, float, float] = (0.7, 0.15, 0.15)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(f) / s for f, s in zip(self.fov_mm, self.shape))


def case_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of case ``index``: independent of the number of cases and of workers."""
    return np.random.default_rng([int(seed), int(index)])


def sample_case_spec(rng: np.random.Generator) -> dict:
    """Draw the random anatomy and lesions of one case (cheap; no voxels yet)."""
    u = rng.uniform
    spec = {
        "prostate_center": [u(-4, 0), u(-8, -4), u(-2, 2)],  # (z, y, x) mm; y<0 is posterior
        "prostate_radii": [u(14, 19), u(12, 16), u(18, 24)],
        "tz_scale": u(0.75, 1.2),  # BPH variation of the transition zone
        "rectum_x": u(-3, 3),
        "bladder_center_z": u(22, 30),
        "gas_fraction": u(0.0, 0.6),
        "warp_seed": int(rng.integers(2**31)),
        "bias_seed": int(rng.integers(2**31)),
        "noise_seed": int(rng.integers(2**31)),
        "lesions": [],
    }
    n = int(rng.choice(4, p=NUM_LESIONS_P))
    for _ in range(n):
        spec["lesions"].append({
            "grade": int(rng.choice(5, p=GRADE_P)) + 1,
            "zone": "pz" if rng.uniform() < 0.7 else "tz",
            "pick": float(rng.uniform()),  # which voxel of the zone becomes the centre
            "radii": [u(4.0, 8.0), u(3.0, 7.0), u(3.0, 7.0)],
        })
    grades = [les["grade"] for les in spec["lesions"]]
    spec["grade"] = max(grades, default=0)
    spec["cspca"] = int(spec["grade"] >= 2)
    return spec


def _smooth_noise(rng, shape, sigma_vox):
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma_vox, mode="wrap")
    return field / (field.std() + 1e-8)


def _soft(r, radius_mm, width_mm=0.7):
    """Partial-volume membership from a normalised radius r (< 1 inside)."""
    return 1.0 / (1.0 + np.exp(-np.clip((1.0 - r) * radius_mm / width_mm, -30, 30)))


def _ellipsoid_r(z, y, x, center, radii):
    return np.sqrt(((z - center[0]) / radii[0]) ** 2 + ((y - center[1]) / radii[1]) ** 2
                   + ((x - center[2]) / radii[2]) ** 2)


def render_case(spec: dict, cfg: PhantomConfig = PhantomConfig()) -> dict:
    """Voxelise one case: float32 t2w, dwi, adc and uint8 gland, lesion (ISUP grade) in (D, H, W)."""
    shape = tuple(cfg.shape)
    sp = np.asarray(cfg.spacing, dtype=np.float32)
    axes = [(np.arange(n, dtype=np.float32) - (n - 1) / 2) * s for n, s in zip(shape, sp)]
    z, y, x = np.meshgrid(*axes, indexing="ij")
    # Global smooth elastic warp (up to ~3 mm) so each case has its own anatomy.
    # Gaussian radial basis on a coarse 4x5x5 lattice, expanded separably (cheap and C-infinity smooth).
    wr = np.random.default_rng(spec["warp_seed"])
    coarse = wr.standard_normal((3, 4, 5, 5)).astype(np.float32) * 1.5
    bases = []
    for ax, n in zip(axes, (4, 5, 5)):
        centers = np.linspace(ax[0], ax[-1], n, dtype=np.float32)
        width = (ax[-1] - ax[0]) / (n - 1)
        bases.append(np.exp(-0.5 * ((ax[:, None] - centers[None]) / width) ** 2).astype(np.float32))
    disp = np.einsum("ai,bj,ck,nijk->nabc", *bases, coarse, optimize=True)
    z, y, x = z + disp[0], y + disp[1], x + disp[2]

    props = np.empty((3,) + shape, np.float32)
    props[:] = np.asarray(TISSUE["fat"], np.float32)[:, None, None, None]  # subcutaneous fat ring outside
    margin = 10.0  # mm: covers the warp and the soft edge

    def box(center, radii):
        """Index slices of the voxels that can lie within an ellipsoid (None radius = whole axis)."""
        out = []
        for ax, c, r in zip(axes, center, radii):
            if r is None:
                out.append(slice(None))
                continue
            lo = np.searchsorted(ax, c - r - margin)
            hi = np.searchsorted(ax, c + r + margin)
            out.append(slice(int(lo), max(int(hi), int(lo) + 1)))
        return tuple(out)

    def ell(center, radii, sl, width=0.7):
        """Soft membership of an axis-aligned ellipsoid in the warped frame, on the slices ``sl``."""
        rad = [1e9 if r is None else r for r in radii]
        r = _ellipsoid_r(z[sl], y[sl], x[sl], center, rad)
        return _soft(r, float(np.mean([v for v in radii if v is not None])), width)

    def paint(member, tissue, sl=(slice(None),) * 3):
        val = np.asarray(TISSUE[tissue] if isinstance(tissue, str) else tissue, np.float32)
        region = props[(slice(None),) + sl]
        region += (val[:, None, None, None] - region) * member

    rb = np.sqrt((y / 44.0) ** 2 + (x / 46.0) ** 2)
    body = _soft(rb, 45.0)
    paint(_soft(np.sqrt((y / 38.0) ** 2 + (x / 40.0) ** 2), 39.0), "soft")
    for side in (-1, 1):
        c, r = (0.0, -2.0, side * 31.0), (None, 14.0, 6.0)
        sl = box(c, r)
        paint(ell(c, r, sl), "muscle", sl)
    c, r = (0.0, 30.0, 0.0), (None, 6.0, 12.0)
    sl = box(c, r)
    paint(ell(c, r, sl), "bone", sl)
    rx = spec["rectum_x"]
    c, r = (0.0, -25.0, rx), (None, 10.0, 10.0)
    sl = box(c, r)
    paint(ell(c, r, sl), "rectum_wall", sl)
    gas_r = 7.0 * np.sqrt(spec["gas_fraction"])
    if gas_r > 0.5:
        paint(ell(c, (None, gas_r, gas_r), sl), "gas", sl)
    c, r = (spec["bladder_center_z"], 6.0, 0.0), (18.0, 20.0, 26.0)
    sl = box(c, r)
    paint(ell(c, r, sl), "bladder", sl)

    pc, pr = spec["prostate_center"], spec["prostate_radii"]
    gsl = box(pc, pr)
    m_gland = np.zeros(shape, np.float32)
    m_gland[gsl] = ell(pc, pr, gsl)
    ts = spec["tz_scale"]
    tz_c = (pc[0] + 0.1 * pr[0], pc[1] + 0.25 * pr[1], pc[2])
    tz_rad = (0.7 * pr[0] * ts, 0.55 * pr[1] * ts, 0.6 * pr[2] * ts)
    m_tz = np.maximum(ell(tz_c, tz_rad, gsl), _soft((tz_c[1] - y[gsl]) / 2.0 + 1.0, 2.0))  # anterior stroma is TZ
    mg = m_gland[gsl]
    paint(mg * (1 - m_tz), "pz", gsl)
    paint(mg * m_tz, "tz", gsl)
    gland = np.zeros(shape, np.uint8)
    inside = mg > 0.5
    gland[gsl][inside & (m_tz > 0.5)] = 1
    gland[gsl][inside & (m_tz <= 0.5)] = 2
    if not (gland == 1).any() or not (gland == 2).any():
        raise DataError(f"phantom case spec {spec['warp_seed']}: degenerate gland (no TZ or PZ voxels)")

    # Smooth tissue heterogeneity on T2w and ADC.
    nr = np.random.default_rng(spec["noise_seed"])
    props[0] *= 1 + cfg.texture * _smooth_noise(nr, shape, (1.0, 2.0, 2.0))
    props[1] *= 1 + 0.7 * cfg.texture * _smooth_noise(nr, shape, (1.0, 2.0, 2.0))

    lesion = np.zeros(shape, np.uint8)
    for les in spec["lesions"]:
        zone_idx = np.flatnonzero(gland.ravel() == (2 if les["zone"] == "pz" else 1))
        cidx = np.unravel_index(zone_idx[min(int(les["pick"] * len(zone_idx)), len(zone_idx) - 1)], shape)
        center = (float(z[cidx]), float(y[cidx]), float(x[cidx]))
        sl = box([axes[k][cidx[k]] for k in range(3)], les["radii"])
        m = ell(center, les["radii"], sl, 0.5) * m_gland[sl]
        c = GRADE_CONTRAST[les["grade"] - 1]
        # Darker T2w and lower ADC than the surrounding tissue, same b=0 signal.
        region = props[(slice(None),) + sl]
        region *= 1 - m * np.asarray([0.5 * c, 0.5 * c, 0.0], np.float32)[:, None, None, None]
        vox = np.zeros(shape, bool)
        vox[sl] = m > 0.5
        if not vox.any():  # a lesion too small for the grid still marks its centre voxel
            vox[cidx] = True
        lesion[vox] = np.maximum(lesion[vox], les["grade"])

    t2, adc_true, s0 = props
    t2, s0 = t2 * body, s0 * body * cfg.dwi_scale
    # Smooth multiplicative bias fields (coil sensitivity), separate for T2w and the DWI series.
    br = np.random.default_rng(spec["bias_seed"])
    fields = []
    for _ in range(2):
        coef = br.uniform(-1, 1, size=6)
        zz, yy, xx = (z / 40.0, y / 48.0, x / 48.0)
        f = (coef[0] * zz + coef[1] * yy + coef[2] * xx
             + 0.5 * (coef[3] * yy * yy + coef[4] * xx * xx + coef[5] * yy * xx))
        fields.append(np.exp(cfg.bias * f / 2.0).astype(np.float32))
    t2 = t2 * fields[0]
    s0 = s0 * fields[1]
    sb = s0 * np.exp(-B_VALUE * adc_true)

    def rician(sig, sigma):
        return np.sqrt((sig + sigma * nr.standard_normal(shape, np.float32)) ** 2
                       + (sigma * nr.standard_normal(shape, np.float32)) ** 2)

    t2 = rician(t2, cfg.t2_noise)
    sigma_d = cfg.dwi_noise * 1000.0 * cfg.dwi_scale
    s0_n, sb_n = rician(s0, sigma_d), rician(sb, sigma_d)
    adc = -np.log(np.maximum(sb_n, 1e-3) / np.maximum(s0_n, 1e-3)) / B_VALUE
    adc = np.where(s0_n > 4 * sigma_d, np.clip(adc, 0.0, 4000.0), 0.0)  # scanners zero ADC in air
    return {
        "t2w": t2.astype(np.float32), "dwi": sb_n.astype(np.float32), "adc": adc.astype(np.float32),
        "gland": gland, "lesion": lesion,
        "labels": {"cspca": spec["cspca"], "grade": spec["grade"], "num_lesions": len(spec["lesions"])},
    }


def affine_for(cfg: PhantomConfig) -> np.ndarray:
    """RAS+ affine of the phantom grid: voxel (i, j, k) = (W, H, D) indices, centred at the origin."""
    sd, sh, sw = cfg.spacing
    aff = np.diag([sw, sh, sd, 1.0])
    aff[:3, 3] = [-(cfg.shape[2] - 1) / 2 * sw, -(cfg.shape[1] - 1) / 2 * sh, -(cfg.shape[0] - 1) / 2 * sd]
    return aff


def _write_nifti(arr, affine, path, dtype):
    img = nib.Nifti1Image(np.asarray(arr).transpose(2, 1, 0).astype(dtype), affine)
    img.header.set_xyzt_units("mm")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, path)


MANIFEST_COLUMNS = ("case_id", "split", "t2w", "adc", "dwi", "gland", "lesion", "cspca", "grade")


def _split_of(index: int, n: int, fractions) -> str:
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    return "train" if index < n_train else "val" if index < n_train + n_val else "test"


def _make_one(args):
    index, n, seed, cfg, out = args
    case_id = f"phantom{index:04d}"
    spec = sample_case_spec(case_rng(seed, index))
    vols = render_case(spec, cfg)
    aff = affine_for(cfg)
    rel = {}
    os.makedirs(os.path.join(out, case_id), exist_ok=True)
    volumes = (("t2w", np.uint16), ("adc", np.uint16), ("dwi", np.uint16), ("gland", np.uint8), ("lesion", np.uint8))
    for name, dtype in volumes:
        rel[name] = f"{case_id}/{name}.nii.gz"
        data = vols[name]
        if dtype == np.uint16:
            data = np.clip(np.rint(data), 0, 65535)
        _write_nifti(data, aff, os.path.join(out, rel[name]), dtype)
    row = {"case_id": case_id, "split": _split_of(index, n, cfg.splits), **rel,
           "cspca": vols["labels"]["cspca"], "grade": vols["labels"]["grade"]}
    return row, {"case_id": case_id, **spec}


def make_phantom(out: str | os.PathLike, cases: int = 200, *, shape=(32, 96, 96), seed: int = 0,
                 workers: int | None = None, progress: bool = True, overwrite: bool = False) -> str:
    """Write a phantom cohort (NIfTI + ``manifest.csv``) to ``out``; return the manifest path.

    The write is atomic (a temporary sibling directory renamed at the end). Re-running with the
    same arguments into a complete directory is a no-op; different arguments raise DataError
    unless ``overwrite``.
    """
    out = os.path.abspath(os.fspath(out))
    cfg = PhantomConfig(shape=tuple(int(s) for s in shape))
    if cases < 1:
        raise DataError(f"phantom: --cases must be >= 1, got {cases}")
    if min(cfg.shape) < 16:
        raise DataError(f"phantom: shape {cfg.shape} too small (every axis must be >= 16)")
    recipe = {"cases": int(cases), "seed": int(seed), "config": asdict(cfg), "format": 1}
    manifest = os.path.join(out, "manifest.csv")
    if os.path.exists(out):
        info_path = os.path.join(out, "phantom.json")
        if os.path.isfile(info_path) and os.path.isfile(manifest):
            with open(info_path) as f:
                old = json.load(f).get("recipe")
            if old == json.loads(json.dumps(recipe)) and not overwrite:
                return manifest
        if not overwrite:
            raise DataError(f"{out}: exists and is not this phantom (cases={cases}, seed={seed}, shape={cfg.shape}); "
                            "choose another output folder or overwrite it (--overwrite)")
    with atomic_dir(out) as tmp:
        jobs = [(i, cases, seed, cfg, tmp) for i in range(cases)]
        workers = max(1, min(workers or os.cpu_count() or 1, cases))
        from tqdm.auto import tqdm

        bar = tqdm(total=cases, desc="phantom", unit="case", disable=not progress)
        results = []
        if workers == 1:
            for job in jobs:
                results.append(_make_one(job))
                bar.update()
        else:
            # Forking a process that already runs JAX's threads can deadlock: spawn then.
            ctx = multiprocessing.get_context("spawn" if "jax" in sys.modules else None)
            with cf.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
                for res in pool.map(_make_one, jobs, chunksize=max(1, cases // (8 * workers))):
                    results.append(res)
                    bar.update()
        bar.close()
        with open(os.path.join(tmp, "manifest.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
            w.writeheader()
            for row, _ in results:
                w.writerow(row)
        with open(os.path.join(tmp, "phantom.json"), "w") as f:
            json.dump({"recipe": recipe, "spacing_dhw_mm": cfg.spacing,
                       "cases": [spec for _, spec in results]}, f, indent=1)
    return manifest
