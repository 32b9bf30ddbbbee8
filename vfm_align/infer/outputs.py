"""Writing predictions in the formats clinical pipelines read, with a sidecar that makes a folder resumable.

Per case (a folder): NIfTI maps on the input grid (same shape, affine and header geometry), and
``prediction.json`` recording the model, the settings, the preprocessing recipe and the file of each
output role:

* segmentation: ``label`` (uint8 arg-max) and ``prob`` (4D float32, one volume per class);
* detection: ``likelihood`` (float32 lesion probability), ``detection_map`` (PI-CAI: each lesion
  candidate of ``report_guided_annotation.extract_lesion_candidates`` filled with its one
  confidence), ``label`` (likelihood > threshold) and the case score (max of the detection map);
* classification: the class probabilities (in the sidecar and the cohort's ``predictions.csv``);
* restoration: ``restored`` (4D float32, the restored channels in normalised intensity units).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os

import nibabel as nib
import numpy as np

from vfm_align.atomic import atomic_file, write_json
from vfm_align.data.nifti import Volume, save_like
from vfm_align.errors import DataError

SIDECAR = "prediction.json"
FILES = {"label": "label.nii.gz", "prob": "prob.nii.gz", "likelihood": "lesion_prob.nii.gz",
         "detection_map": "detection_map.nii.gz", "restored": "restored.nii.gz", "gland": "predicted_gland.nii.gz"}


def settings_key(model_identity: str, settings: dict) -> str:
    """What a case's outputs depend on besides its inputs: the weights and the inference settings."""
    return hashlib.sha256(json.dumps([model_identity, settings], sort_keys=True).encode()).hexdigest()


def is_done(case_dir: str, key: str, *, overwrite: bool = False) -> bool:
    """True when ``case_dir`` holds every output of a run with ``key``; DataError when it holds another run's."""
    path = os.path.join(case_dir, SIDECAR)
    if not os.path.isfile(path):
        return False
    try:
        with open(path) as fh:
            meta = json.load(fh)
    except (OSError, json.JSONDecodeError):
        return False
    if meta.get("key") != key:
        if overwrite:
            return False
        raise DataError(f"{path}: holds a prediction of another model or settings; use another --out or --overwrite")
    return all(os.path.isfile(os.path.join(case_dir, f)) for f in meta.get("outputs", {}).values())


def save_4d_like(data: np.ndarray, ref: Volume, path: str) -> str:
    """Write a (D, H, W, K) array as a 4D NIfTI (x, y, z, K) on ``ref``'s grid, atomically."""
    if data.shape[:3] != ref.data.shape:
        raise DataError(f"{path}: array shape {data.shape[:3]} does not match the reference grid {ref.data.shape}")
    header = ref.header.copy()
    header.set_data_dtype(np.float32)
    img = nib.Nifti1Image(np.asarray(data, np.float32).transpose(2, 1, 0, 3), ref.affine, header)
    with atomic_file(path, suffix=".nii.gz") as tmp:
        nib.save(img, tmp)
    return path


def detection_map(likelihood: np.ndarray) -> np.ndarray:
    """PI-CAI detection map: lesion candidates, each holding one confidence (picai_eval's expected input)."""
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints a citation banner on import
        from report_guided_annotation import extract_lesion_candidates
    return extract_lesion_candidates(np.asarray(likelihood, np.float32))[0].astype(np.float32)


def write_case(case_dir: str, task: str, ref: Volume, arrays: dict, meta: dict, *, threshold: float,
               names: dict | None = None) -> dict:
    """Write one case's outputs and its sidecar (last, so an interrupted case is redone). Returns the sidecar."""
    names = {**FILES, **(names or {})}
    os.makedirs(case_dir, exist_ok=True)
    outputs, extra = {}, {}

    def put(role, data, dtype):
        outputs[role] = names[role]
        save_like(data, ref, os.path.join(case_dir, names[role]), dtype=dtype)

    if task == "segmentation":
        outputs["prob"] = names["prob"]
        save_4d_like(arrays["prob"], ref, os.path.join(case_dir, names["prob"]))
        put("label", arrays["prob"].argmax(-1).astype(np.uint8), np.uint8)
    elif task == "detection":
        lik = arrays["likelihood"]
        put("likelihood", lik, np.float32)
        put("label", (lik > threshold).astype(np.uint8), np.uint8)
        det = detection_map(lik)
        put("detection_map", det, np.float32)
        extra["case_score"] = float(det.max())
        extra["num_candidates"] = len(np.unique(det[det > 0]))
        if arrays.get("gland") is not None:
            put("gland", arrays["gland"], np.uint8)
    elif task == "classification":
        extra["probabilities"] = [float(p) for p in arrays["probs"]]
        extra["predicted_class"] = int(np.argmax(arrays["probs"]))
    else:
        outputs["restored"] = names["restored"]
        save_4d_like(arrays["restored"], ref, os.path.join(case_dir, names["restored"]))
    side = {**meta, "task": task, "threshold": threshold, "outputs": outputs, **extra,
            "grid": {"shape_xyz": list(ref.data.shape[::-1]), "affine": ref.affine.tolist(), "source": ref.path}}
    write_json(os.path.join(case_dir, SIDECAR), side)
    return side


def write_tables(out_dir: str, sidecars: list[dict]) -> list[str]:
    """``predictions.csv`` (classification: case probabilities) and ``case_scores.csv`` (detection)."""
    written = []
    cls = [s for s in sidecars if "probabilities" in s]
    if cls:
        k = len(cls[0]["probabilities"])
        rows = [[s["case_id"], *s["probabilities"], s["predicted_class"]] for s in cls]
        written.append(_write_csv(os.path.join(out_dir, "predictions.csv"),
                                  ["case_id", *[f"prob_{i}" for i in range(k)], "predicted_class"], rows))
    det = [s for s in sidecars if "case_score" in s]
    if det:
        written.append(_write_csv(os.path.join(out_dir, "case_scores.csv"), ["case_id", "case_score"],
                                  [[s["case_id"], s["case_score"]] for s in det]))
    return written


def _write_csv(path: str, header: list, rows: list) -> str:
    with atomic_file(path) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


def read_sidecar(case_dir: str) -> dict:
    path = os.path.join(case_dir, SIDECAR)
    try:
        with open(path) as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise DataError(f"{path}: no prediction (run vfm-align infer into this folder first)") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: corrupt prediction sidecar ({exc})") from exc
