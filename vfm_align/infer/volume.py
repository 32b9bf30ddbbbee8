"""One case through a volume model (converted ProFound or fine-tuned): preprocessing, windows, back to the input grid.

Preprocessing is the model's own recipe (see :mod:`vfm_align.infer.loading`):

* "profound_reference": :func:`vfm_align.data.preprocess_profound.preprocess_profound` (channels
  [T2w, high-b DWI, ADC], non-zero z-score per channel on the whole volume, no reorientation or
  resampling, as the reference code); dense tasks run sliding windows over the whole volume,
  classification one pass on the reference centre crop / zero pad to 64x224x224;
* "finetune_cache": the fine-tuning cache's recipe (:mod:`vfm_align.data.cache`: reorientation to
  RAS+, non-zero z-score); a manifest case goes through exactly ``preprocess_case``; dense outputs
  are reoriented back onto the input grid, classification uses the validation centre crop / pad.

Restoration models given a manifest case get the task's degraded input (``task.make``), as in
fine-tuning's validation; given NIfTI files, those are taken as the degraded input.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from nibabel import orientations as ornt

from vfm_align.data.nifti import Volume
from vfm_align.infer.loading import InferenceModel
from vfm_align.infer.sliding_window import SIGMA_SCALE, sliding_window_inference


@dataclasses.dataclass
class VolumePrediction:
    task: str
    reference: Volume  # the input grid (the T2w volume)
    arrays: dict  # "prob" (D,H,W,K) | "likelihood" (D,H,W) | "probs" (K,) | "restored" (D,H,W,K), on the input grid
    preprocessing: dict


def _canonical_xfm(affine: np.ndarray) -> np.ndarray:
    return ornt.ornt_transform(ornt.io_orientation(affine), ornt.axcodes2ornt(("R", "A", "S")))


def _apply_xfm(x_dhw: np.ndarray, xfm: np.ndarray) -> np.ndarray:
    """Apply an orientation transform (over the NIfTI (x, y, z) axes) to a (D, H, W, ...) array."""
    axes = (2, 1, 0) + tuple(range(3, x_dhw.ndim))
    return np.ascontiguousarray(ornt.apply_orientation(x_dhw.transpose(axes), xfm).transpose(axes))


def to_canonical_array(x_dhw: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """A (D, H, W, ...) array on ``affine``'s grid reoriented to RAS+ (as ``data.resample.to_canonical``)."""
    return _apply_xfm(x_dhw, _canonical_xfm(affine))


def from_canonical_array(x_dhw: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The inverse of :func:`to_canonical_array`: a RAS+ array back onto the grid of ``affine``."""
    current = ornt.io_orientation(affine)
    return _apply_xfm(x_dhw, ornt.ornt_transform(ornt.axcodes2ornt(("R", "A", "S")), current))


def finetune_recipe() -> dict:
    """The "finetune_cache" preprocessing as recorded in predictions and exported models' sidecars."""
    from vfm_align.data.cache import Recipe

    return {"name": "finetune_cache", "cache_recipe": dataclasses.asdict(Recipe()), "channels": ["t2w", "dwi", "adc"],
            "missing_channels": "zeros", "reorient": "RAS+ (the training cache's), outputs reoriented back onto the "
                                                     "input grid"}


def _predictor(model: InferenceModel):
    """(predict(state, x), state): the model's jittable window function, built once per model so its compiled
    steps are reused across cases; the weights go in as an argument (not as constants of the executable)."""
    if getattr(model, "_predict", None) is not None:
        return model._predict
    graphdef, state = nnx.split(model.module)

    def predict(state, x):
        out = nnx.merge(graphdef, state)(x)
        if isinstance(out, tuple):  # TaskModel: (out, aux)
            out = out[0]
        out = out.astype(jnp.float32)
        if model.activation == "softmax":
            return jax.nn.softmax(out, axis=-1)
        return jax.nn.sigmoid(out) if model.activation == "sigmoid" else out

    model._predict = (predict, state)
    return model._predict


REORIENT = ("none", "ras")  # converted ProFound models: "none" as the reference, "ras" an opt-in RAS+ reorientation


def _input(model: InferenceModel, images: dict, case=None, reorient: str = "none"):
    """(image (D,H,W,3) on the model's grid, reference Volume, back-to-input-grid function, recipe dict)."""
    from vfm_align.data.nifti import load_volume
    from vfm_align.data.preprocess_profound import stack_channels

    if model.recipe == "profound_reference":
        from vfm_align.data.preprocess_profound import preprocess_profound

        inp = preprocess_profound(images["t2w"], images.get("dwi"), images.get("adc"), crop=False)
        recipe = {"name": "profound_reference", "channels": ["t2w", "dwi", "adc"], "missing_channels": "zeros",
                  "normalize": "zscore_nonzero (per channel, whole volume)", "reorient": "none (as the reference)",
                  "resample": "none"}
        if reorient == "ras":  # opt-in; the z-score does not depend on the voxel order
            recipe["reorient"] = "RAS+ (--reorient ras, a deviation: the reference does none); outputs reoriented back"
            affine = inp.reference.affine
            return (to_canonical_array(inp.image, affine), inp.reference,
                    (lambda y: from_canonical_array(y, affine)), recipe)
        return inp.image, inp.reference, (lambda y: y), recipe
    from vfm_align.data.cache import Recipe, preprocess_case, zscore_nonzero

    recipe = finetune_recipe()
    if case is not None:
        sample = preprocess_case(case, Recipe())
        ref = load_volume(case.paths["t2w"], kind="t2w")
        image = sample["image"]
        if model.task in ("super_resolution", "distortion_correction"):
            from vfm_align.data.tasks import get_task

            s = {**sample, "labels": dict(case.labels), "case_id": case.case_id, "spacing": sample["meta"]["spacing"]}
            image = get_task(model.task).make(s)[0]
            recipe["task_input"] = f"the {model.task} task's degraded input (task.make)"
    else:
        image, ref = stack_channels(images["t2w"], images.get("dwi"), images.get("adc"))
        image = zscore_nonzero(to_canonical_array(image, ref.affine))
    return image, ref, (lambda y: from_canonical_array(y, ref.affine)), recipe


def predict_volume(model: InferenceModel, images: dict, *, case=None, overlap: float = 0.5, batch_size: int = 1,
                   sigma_scale: float = SIGMA_SCALE, progress: bool = False,
                   reorient: str = "none") -> VolumePrediction:
    """``images``: {"t2w": path, optional "dwi", "adc"} (or ``case``, a manifest Case, for the fine-tune recipe).
    ``reorient``: "none" or "ras" (converted ProFound models only; fine-tuned ones always use their training's)."""
    from vfm_align.data.preprocess_profound import center_crop_pad
    from vfm_align.errors import ConfigError

    if reorient not in REORIENT:
        raise ConfigError(f"reorient must be one of {REORIENT}, got '{reorient}'")
    if reorient != "none" and model.recipe != "profound_reference":
        raise ConfigError(f"--reorient applies to converted ProFound models; {model.path} uses the "
                          f"'{model.recipe}' recipe")
    image, ref, back, recipe = _input(model, images, case, reorient)
    predict, state = _predictor(model)
    if model.task == "classification":
        crop, _ = center_crop_pad(image, model.roi)
        if getattr(model, "_jit", None) is None:
            model._jit = jax.jit(predict)
        probs = np.asarray(model._jit(state, jnp.asarray(crop[None])))[0]
        recipe = {**recipe, "crop": f"centre crop / zero pad to {list(model.roi)}"}
        return VolumePrediction(model.task, ref, {"probs": probs.astype(np.float64)}, recipe)
    out = sliding_window_inference(predict, image, model.roi, overlap=overlap, sigma_scale=sigma_scale,
                                   batch_size=batch_size, params=state, progress=progress)
    out = back(out)
    recipe = {**recipe, "sliding_window": {"roi": list(model.roi), "overlap": overlap, "mode": "gaussian",
                                           "sigma_scale": sigma_scale, "padding": "constant 0"}}
    if model.task == "detection":
        arrays = {"likelihood": out[..., 1] if out.shape[-1] == 2 else out[..., 0]}
    elif model.task == "segmentation":
        arrays = {"prob": out}
    else:
        arrays = {"restored": out}
    return VolumePrediction(model.task, ref, arrays, recipe)
