"""ProViCNet whole-volume inference, with the reference preprocessing.

Per sequence (T2, ADC or DWI) and its gland mask, on one grid:

1. intensities / 255, then z-scored with the mean and (population) std of the voxels where
   gland == 1 over the whole volume;
2. 2.5D stacks: for every slice j, the 3 consecutive slices centred on it, the window shifted
   inward at the volume edges; volumes with fewer than 6 slices get one zero slice on each side
   first (their predictions are dropped again at the end); position token input (j, Z);
3. each stack resized bilinearly (half-pixel) to 448 x 448 on the device;
4. the model's softmax over classes; cancer probability = p(indolent) + p(csPCa);
5. cancer label = probability > 0.4.

The model predicts 256 x 256 in-plane (the reference's 0.5 mm, 128 mm grid). If the input
in-plane size differs, the probability map is resized bilinearly to the input size before
thresholding, so outputs always lie on the input grid (same shape and affine).

Without a gland mask (a deviation from the reference, whose inference needs one): a first pass
normalises with the statistics of the whole volume (/255, then z-score over every voxel); the
voxels it predicts as gland or cancer (arg-max class >= 1, on the input grid) are the mask of a
second pass with the reference normalisation. When the first pass finds no gland, its result is
kept and the prediction says so (``gland_source``).
"""

from __future__ import annotations

import dataclasses
import os
import weakref
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from vfm_align.data.nifti import Volume, check_same_grid, load_volume, save_like
from vfm_align.errors import ConfigError, DataError

SEQUENCES = ("t2w", "adc", "dwi")  # the fusion model's order
CANCER_CLASSES = (2, 3)  # 0 background, 1 gland, 2 indolent cancer, 3 csPCa
THRESHOLD = 0.4
N_CHANNEL = 3  # consecutive slices per 2.5D stack


@dataclasses.dataclass
class ProViCNetPrediction:
    """Outputs on the input grid, (D, H, W)."""

    prob: np.ndarray  # float32 cancer probability
    label: np.ndarray  # uint8, prob > threshold
    reference: Volume  # geometry to write onto
    threshold: float
    gland_source: str = "given"  # "given", "first pass" (predicted), or "none found (whole-volume normalisation)"
    gland: np.ndarray | None = None  # the predicted gland mask (uint8) when it came from the first pass


def normalize_volume(image: np.ndarray, gland: np.ndarray, *, source: str = "image",
                     mask_source: str = "mask") -> np.ndarray:
    """/255, then z-score with the statistics of the voxels inside the gland (gland == 1)."""
    x = (image.astype(np.float64) / 255.0).astype(np.float32)
    inside = gland == 1
    if not inside.any():
        raise DataError(f"{mask_source}: gland mask is empty (no voxel equals 1); the intensity normalisation needs it")
    vals = x[inside]
    mean, std = vals.mean(), vals.std()
    if not np.isfinite(std) or std <= 0:
        raise DataError(f"{source}: intensity is constant inside the gland mask ({mask_source}); cannot normalise")
    return (x - mean) / std


def normalize_whole(image: np.ndarray, *, source: str = "image") -> np.ndarray:
    """/255, then z-score with the statistics of the whole volume (the first pass without a gland mask)."""
    x = (image.astype(np.float64) / 255.0).astype(np.float32)
    std = x.std(dtype=np.float64)
    if not np.isfinite(std) or std <= 0:
        raise DataError(f"{source}: intensity is constant over the volume; cannot normalise")
    return ((x - x.mean(dtype=np.float64)) / std).astype(np.float32)


def slice_windows(depth: int, n_channel: int = N_CHANNEL) -> tuple[int, np.ndarray, np.ndarray]:
    """(pad, centres, pos) of the reference 2.5D stacking for a ``depth``-slice volume.

    ``pad`` zero slices go on each side (only when depth < 2 * n_channel); ``centres[j]`` is the
    centre slice (in the padded volume) of the window used for output slice j; ``pos[j]`` =
    (j, padded depth).
    """
    half = n_channel // 2
    pad = half if depth < 2 * n_channel else 0
    zp = depth + 2 * pad
    centres = []
    for j in range(zp):
        c = j
        if c - half < 0:
            c += half
        elif c + half >= zp:
            c -= half
        centres.append(c)
    pos = np.stack([np.arange(zp, dtype=np.float32), np.full(zp, zp, np.float32)], axis=1)
    return pad, np.asarray(centres), pos


def preprocess_volume(image: np.ndarray, gland: np.ndarray | None, *, source: str = "image",
                      mask_source: str = "mask") -> tuple[np.ndarray, np.ndarray, slice]:
    """(D, H, W) image and gland -> (stacks (S, H, W, 3) at input resolution, pos (S, 2), keep).

    ``keep`` selects the S outputs that belong to the D input slices. The resize to the model's
    input size happens on the device (see :func:`_runner`). ``gland=None``: whole-volume statistics.
    """
    if gland is None:
        x = normalize_whole(image, source=source)
    else:
        x = normalize_volume(image, gland, source=source, mask_source=mask_source)
    pad, centres, pos = slice_windows(x.shape[0])
    if pad:
        x = np.pad(x, ((pad, pad), (0, 0), (0, 0)))
    half = N_CHANNEL // 2
    idx = centres[:, None] + np.arange(-half, half + 1)[None]
    stacks = np.ascontiguousarray(x[idx].transpose(0, 2, 3, 1))  # (S, H, W, 3) channels-last
    return stacks, pos, slice(pad, pad + image.shape[0])


def _model_input_size(model) -> int:
    return model.config.img_size


_RUNNERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {what: runner}, reused across cases


def _runner(model, what: str):
    """A jitted (stacks, pos) -> output function; stacks are resized to the model input on device."""
    cache = _RUNNERS.setdefault(model, {})
    if what not in cache:
        cache[what] = _make_runner(model, what)
    return cache[what]


def _make_runner(model, what: str):
    graphdef, state = nnx.split(model)
    size = _model_input_size(model)

    @jax.jit
    def step(state, stacks, pos):
        m = nnx.merge(graphdef, state)
        n, _, _, c = stacks.shape
        x = jax.image.resize(stacks, (n, size, size, c), method="linear", antialias=False)
        if what == "tokens":
            return m.patch_tokens(x, pos)
        return jax.nn.softmax(m(x, pos), axis=-1)

    return partial(step, state)


def _batched(fn, arrays: tuple[np.ndarray, ...], batch_size: int, desc: str, progress: bool) -> np.ndarray:
    """Run ``fn`` over the leading axis in fixed-size batches (last one padded: one compile).

    Batch i+1 is dispatched before batch i is fetched, so host-side slicing overlaps device work.
    """
    total = arrays[0].shape[0]
    outs, pending = [], None
    starts = range(0, total, batch_size)
    for s in tqdm(starts, desc=desc, unit="batch", disable=not progress, total=len(starts)):
        chunk = [a[s: s + batch_size] for a in arrays]
        n = chunk[0].shape[0]
        if n < batch_size:
            chunk = [np.concatenate([c, np.zeros((batch_size - n, *c.shape[1:]), c.dtype)]) for c in chunk]
        out = fn(*chunk)
        if pending is not None:
            outs.append(np.asarray(pending[0])[: pending[1]])
        pending = (out, n)
    outs.append(np.asarray(pending[0])[: pending[1]])
    return np.concatenate(outs)


def _to_grid(prob: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """(D', h, w[, K]) model-resolution probabilities -> the input's (D, H, W[, K]), bilinear in-plane."""
    shape = tuple(shape) + tuple(prob.shape[3:])
    if prob.shape[1:] != shape[1:]:
        prob = np.asarray(jax.image.resize(jnp.asarray(prob), shape, method="linear"))
    return np.clip(prob, 0.0, 1.0).astype(np.float32)


def _cancer_prob(probs: np.ndarray) -> np.ndarray:
    return probs[..., list(CANCER_CLASSES)].sum(axis=-1)


def _as_model(model, arch: str, what: str):
    """Accept a model object or a model directory; check its architecture."""
    from vfm_align.models.provicnet import ProViCNet, ProViCNetFusion

    if isinstance(model, (str, os.PathLike)):
        from vfm_align.model_io import load

        model = load(model)
    cls = ProViCNet if arch == "provicnet" else ProViCNetFusion
    if not isinstance(model, cls):
        raise ConfigError(f"{what}: expected a '{arch}' model, got {type(model).__name__}")
    return model


def _load_inputs(images: dict[str, str], gland_path: str | None) -> tuple[dict[str, Volume], Volume | None]:
    vols = {name: load_volume(path, kind=f"{name} image") for name, path in images.items()}
    gland = None if gland_path is None else load_volume(gland_path, kind="gland mask")
    check_same_grid({**vols, **({} if gland is None else {"gland mask": gland})})
    return vols, gland


def _finish(probs_model_res: np.ndarray, keep: slice, ref: Volume, threshold: float) -> ProViCNetPrediction:
    prob = _to_grid(_cancer_prob(probs_model_res[keep]), ref.data.shape)
    return ProViCNetPrediction(prob=prob, label=(prob > threshold).astype(np.uint8), reference=ref,
                               threshold=threshold)


def _with_gland(run, vols: dict[str, Volume], gland: Volume | None, threshold: float,
                gland_labels=(1,)) -> ProViCNetPrediction:
    """``run(gland mask or None) -> (class probs (S, h, w, 4), keep)``; the two-pass path when ``gland`` is None.

    A given mask counts the voxels whose value is in ``gland_labels`` (the reference: 1).
    """
    ref = next(iter(vols.values()))
    if gland is not None:
        mask = np.isin(gland.data, gland_labels).astype(np.uint8)
        return _finish(*run(mask, gland.path), ref, threshold)
    probs, keep = run(None, None)
    predicted = (_to_grid(probs[keep], ref.data.shape).argmax(-1) >= 1).astype(np.uint8)
    if not predicted.any():
        pred = _finish(probs, keep, ref, threshold)
        pred.gland_source = "none found (whole-volume normalisation)"
        return pred
    pred = _finish(*run(predicted, "the first pass's predicted gland"), ref, threshold)
    pred.gland_source, pred.gland = "first pass", predicted
    return pred


def predict_sequence(model, image_path: str, gland_path: str | None = None, *, batch_size: int = 8,
                     threshold: float = THRESHOLD, progress: bool = True, gland_labels=(1,)) -> ProViCNetPrediction:
    """One sequence with its per-sequence model (object or model directory); no ``gland_path``: two passes."""
    vols, gland = _load_inputs({"image": image_path}, gland_path)
    vol = vols["image"]
    model = _as_model(model, "provicnet", "model")
    runner = _runner(model, "probs")

    def run(mask, mask_source):
        stacks, pos, keep = preprocess_volume(vol.data, mask, source=vol.path, mask_source=mask_source)
        return _batched(runner, (stacks, pos), batch_size, "ProViCNet slices", progress), keep

    return _with_gland(run, vols, gland, threshold, gland_labels)


def predict_fusion(fusion, models: dict[str, object], images: dict[str, str], gland_path: str | None = None, *,
                   overwrite_streams: bool = True, batch_size: int = 8, threshold: float = THRESHOLD,
                   progress: bool = True, gland_labels=(1,)) -> ProViCNetPrediction:
    """T2 + ADC + DWI through their per-sequence models and the fusion model.

    ``models`` and ``images`` are keyed by "t2w", "adc", "dwi". With ``overwrite_streams`` (the
    reference inference behaviour) each fusion stream's conv + BatchNorm is first replaced by the
    first conv + BatchNorm of the matching per-sequence head; the given fusion model is not modified.
    """
    from vfm_align.models.provicnet import load_stream_heads

    for what, d in (("models", models), ("images", images)):
        if set(d) != set(SEQUENCES):
            raise ConfigError(f"fusion needs {what} for exactly {SEQUENCES}, got {sorted(d)}")
    vols, gland = _load_inputs({s: images[s] for s in SEQUENCES}, gland_path)
    seq_models = {s: _as_model(models[s], "provicnet", f"{s} model") for s in SEQUENCES}
    fusion = _as_model(fusion, "provicnet_fusion", "fusion model")
    if overwrite_streams:
        fusion = load_stream_heads(nnx.clone(fusion), **seq_models)
    runners = {s: _runner(seq_models[s], "tokens") for s in SEQUENCES}
    graphdef, state = nnx.split(fusion)

    @jax.jit
    def fuse(state, t2w, adc, dwi):
        return jax.nn.softmax(nnx.merge(graphdef, state)(t2w, adc, dwi), axis=-1)

    def run(mask, mask_source):
        prepared = {s: preprocess_volume(vols[s].data, mask, source=vols[s].path, mask_source=mask_source)
                    for s in SEQUENCES}
        tokens = {s: _batched(runners[s], prepared[s][:2], batch_size, f"{s} tokens", progress) for s in SEQUENCES}
        probs = _batched(partial(fuse, state), tuple(tokens[s] for s in SEQUENCES), batch_size, "fusion", progress)
        return probs, prepared["t2w"][2]

    return _with_gland(run, vols, gland, threshold, gland_labels)


def recipe_description() -> dict:
    """The preprocessing and post-processing above, for prediction sidecars."""
    return {"name": "provicnet_reference", "normalize": "/255, z-score over the gland mask (whole volume)",
            "stacks": f"{N_CHANNEL} consecutive slices, shifted inward at the edges; zero slices around < 6-slice "
                      "volumes", "resize": "bilinear (half-pixel) to the model input, probabilities back to the "
                      "input in-plane size", "cancer_probability": "p(indolent) + p(csPCa)",
            "without_gland": "first pass with whole-volume z-score; predicted classes >= 1 become the mask"}


def output_paths(out_dir: str | os.PathLike, *, overwrite: bool = False) -> dict[str, str]:
    """The two output files in ``out_dir``; refuses existing ones unless ``overwrite`` (check before a run)."""
    out_dir = os.fspath(out_dir)
    paths = {"prob": os.path.join(out_dir, "cancer_prob.nii.gz"), "label": os.path.join(out_dir, "cancer_label.nii.gz")}
    existing = [p for p in paths.values() if os.path.exists(p)]
    if existing and not overwrite:
        raise DataError(f"{existing[0]}: already exists (pass --overwrite to replace)")
    return paths


def write_prediction(pred: ProViCNetPrediction, out_dir: str | os.PathLike, *,
                     overwrite: bool = False) -> dict[str, str]:
    """Write ``cancer_prob.nii.gz`` (float32) and ``cancer_label.nii.gz`` (uint8) onto the input grid."""
    paths = output_paths(out_dir, overwrite=overwrite)
    save_like(pred.prob, pred.reference, paths["prob"], dtype=np.float32)
    save_like(pred.label, pred.reference, paths["label"], dtype=np.uint8)
    return paths
