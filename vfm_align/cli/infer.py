"""``vfm-align infer``: whole-volume predictions of any model directory, on NIfTI files or a manifest's cases."""

from __future__ import annotations

import os


def register(sub) -> None:
    p = sub.add_parser(
        "infer",
        help="predict whole MRI volumes with a converted or fine-tuned model (NIfTI in, NIfTI/CSV out)",
        description=(
            "Volume models (converted ProFound UperNet / classifier, any fine-tuning run directory): "
            "--model DIR --image T2W [DWI ADC] (channels [T2w, high-b DWI, ADC]; T2w alone gives [T2w, 0, 0]); "
            "dense tasks run Gaussian-weighted sliding windows of the model's input size. ProViCNet: --model DIR "
            "--image IMG [--gland MASK], or --fusion DIR with --model and --image three times each in the order "
            "T2 ADC DWI; without --gland a first pass predicts the gland. A cohort: --data manifest.csv --split test "
            "(one folder per case under --out; finished cases are skipped when the model and settings match). "
            "Outputs lie on each input's grid; prediction.json records the model, settings and preprocessing."
        ),
    )
    p.add_argument("--model", nargs="+", required=True, metavar="DIR",
                   help="model directory or fine-tuning run directory (ProViCNet fusion: three, T2 ADC DWI)")
    p.add_argument("--image", nargs="+", metavar="NIFTI",
                   help="volume model: T2W [DWI ADC]; ProViCNet: the sequence image (fusion: T2 ADC DWI)")
    p.add_argument("--gland", metavar="NIFTI", default=None,
                   help="ProViCNet gland mask (1 inside the prostate); optional")
    p.add_argument("--fusion", metavar="DIR", default=None, help="ProViCNet fusion model directory")
    p.add_argument("--keep-fusion-streams", action="store_true",
                   help="use the fusion checkpoint's own stream weights instead of the per-sequence heads "
                        "(the reference inference overwrites them)")
    p.add_argument("--data", metavar="MANIFEST", default=None, help="cohort manifest (instead of --image)")
    p.add_argument("--split", default="test", help="manifest split to predict (default test; 'all' for every case)")
    p.add_argument("--sequence", choices=("t2w", "adc", "dwi"), default="t2w",
                   help="ProViCNet per-sequence model with --data: the manifest column it reads (default t2w)")
    p.add_argument("--predict-gland", action="store_true",
                   help="ProViCNet with --data: ignore the manifest's gland masks and predict the gland")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--threshold", type=float, default=None,
                   help="label threshold on the lesion/cancer probability (default 0.4 ProViCNet, 0.5 others)")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap (default 0.5)")
    p.add_argument("--roi", type=int, nargs=3, default=None, metavar=("D", "H", "W"),
                   help="window size of a converted ProFound model (default its reference 64 224 224)")
    p.add_argument("--reorient", choices=("none", "ras"), default="none",
                   help="converted ProFound models: 'none' (default, as the reference: the stored voxel order) or "
                        "'ras' (reorient to RAS+ first, outputs put back on the input grid)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="windows (volume models, default 1) or slices (ProViCNet, default 8) per device batch")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _case_id(path: str) -> str:
    name = os.path.basename(path)
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def run(args) -> int:
    from tqdm.auto import tqdm

    from vfm_align.errors import ConfigError, DataError
    from vfm_align.infer.loading import PROVICNET_ARCHS, load_for_inference
    from vfm_align.infer.outputs import SIDECAR, is_done, settings_key, write_tables

    if args.batch_size is not None and args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if (args.image is None) == (args.data is None):
        raise ConfigError("give either --image (one case) or --data MANIFEST (a cohort)")
    if args.fusion and len(args.model) != 3:
        raise ConfigError("fusion needs --model three times, in the order T2 ADC DWI")
    if not args.fusion and len(args.model) != 1:
        raise ConfigError("without --fusion, give exactly one --model")
    model = load_for_inference(args.fusion or args.model[0])
    provicnet = model.arch in PROVICNET_ARCHS
    if args.roi is not None:
        if model.finetuned or provicnet or min(args.roi) < 1:
            raise ConfigError("--roi applies to converted ProFound models (fine-tuned ones use their training size)")
        model.roi = tuple(args.roi)
    if args.reorient != "none" and model.recipe != "profound_reference":
        raise ConfigError("--reorient applies to converted ProFound models (fine-tuned ones use their training's "
                          "RAS+ reorientation; ProViCNet the reference's none)")
    if args.gland and not provicnet:
        raise ConfigError("--gland is used by ProViCNet models only")
    threshold = args.threshold if args.threshold is not None else (0.4 if provicnet else 0.5)
    batch = args.batch_size or (8 if provicnet else 1)
    settings = {"threshold": threshold, "overlap": args.overlap, "roi": model.roi,
                "keep_fusion_streams": args.keep_fusion_streams, "sequence": args.sequence,
                "predict_gland": args.predict_gland,
                "models": [os.path.abspath(m) for m in args.model] if args.fusion else [model.path]}
    if args.reorient != "none":  # only then: folders written before the flag existed keep their key
        settings["reorient"] = args.reorient
    key = settings_key(model.identity, settings)
    progress = not args.quiet

    if args.data is None:  # one case, outputs straight into --out
        _refuse_existing(args.out, args.overwrite)
        case = {"case_id": _case_id(args.image[0]), "images": args.image, "gland": args.gland}
        side = _predict_case(args, model, case, None, args.out, threshold, batch, key, settings, progress)
        write_tables(args.out, [side])
        _report(args.out, side)
        return 0

    from vfm_align.data.cohort import read_manifest

    cohort = read_manifest(args.data)
    cases = cohort.cases if args.split == "all" else cohort.split(args.split)
    if not cases:
        raise DataError(f"{args.data}: no cases in split '{args.split}'")
    sides, skipped = [], 0
    for c in tqdm(cases, desc="infer", unit="case", disable=not progress):
        case_dir = os.path.join(args.out, c.case_id)
        if is_done(case_dir, key, overwrite=args.overwrite):
            skipped += 1
            from vfm_align.infer.outputs import read_sidecar

            sides.append(read_sidecar(case_dir))
            continue
        case = {"case_id": c.case_id, "images": None, "gland": None}
        sides.append(_predict_case(args, model, case, c, case_dir, threshold, batch, key, settings, False))
    tables = write_tables(args.out, sides)
    print(f"{len(sides) - skipped} case(s) predicted, {skipped} already done, into {args.out}"
          + "".join(f"; {os.path.basename(t)}" for t in tables) + f" (per case: {SIDECAR} and NIfTI maps)")
    return 0


def _refuse_existing(out: str, overwrite: bool) -> None:
    from vfm_align.errors import DataError
    from vfm_align.infer.outputs import FILES, SIDECAR

    names = [SIDECAR, "cancer_prob.nii.gz", "cancer_label.nii.gz", "predictions.csv", *FILES.values()]
    existing = [os.path.join(out, n) for n in names if os.path.exists(os.path.join(out, n))]
    if existing and not overwrite:
        raise DataError(f"{existing[0]}: already exists (pass --overwrite to replace)")


def _predict_case(args, model, case, manifest_case, out_dir, threshold, batch, key, settings, progress) -> dict:
    from vfm_align.errors import ConfigError
    from vfm_align.infer.outputs import write_case

    meta = {"case_id": case["case_id"], "key": key, "settings": settings,
            "model": {"path": model.path, "arch": model.arch, "task": model.task, "identity": model.identity}}
    if model.arch in ("provicnet", "provicnet_fusion"):
        return _provicnet_case(args, model, case, manifest_case, out_dir, threshold, batch, meta, progress)
    from vfm_align.infer.volume import predict_volume

    if manifest_case is not None:
        images = {k: manifest_case.paths[k] for k in ("t2w", "dwi", "adc")}
        mc = manifest_case if model.recipe == "finetune_cache" else None
    else:
        if len(case["images"]) not in (1, 3):
            raise ConfigError("a volume model takes --image T2W, or --image T2W DWI ADC")
        images = dict(zip(("t2w", "dwi", "adc"), case["images"]))
        mc = None
    pred = predict_volume(model, images, case=mc, overlap=args.overlap, batch_size=batch, progress=progress,
                          reorient=args.reorient)
    meta["inputs"] = images
    meta["preprocessing"] = pred.preprocessing
    return write_case(out_dir, pred.task, pred.reference, pred.arrays, meta, threshold=threshold)


def _provicnet_case(args, model, case, manifest_case, out_dir, threshold, batch, meta, progress) -> dict:
    from vfm_align.errors import ConfigError
    from vfm_align.infer.outputs import write_case
    from vfm_align.infer.provicnet import (
        SEQUENCES,
        predict_fusion,
        predict_sequence,
        recipe_description,
    )

    gland_labels = (1,)
    if manifest_case is not None:
        paths = manifest_case.paths
        images = [paths[s] for s in SEQUENCES] if args.fusion else [paths[args.sequence]]
        gland = None if args.predict_gland else paths.get("gland")
        gland_labels = (1, 2)  # manifest gland masks are zonal (1 TZ, 2 PZ): the whole gland is the mask
    else:
        images, gland = case["images"], case["gland"]
    if args.fusion:
        if len(images) != 3:
            raise ConfigError("fusion needs --image three times, in the order T2 ADC DWI")
        if getattr(args, "_seq_models", None) is None:  # loaded once for the whole cohort
            from vfm_align.model_io import load

            args._seq_models = {s: load(m) for s, m in zip(SEQUENCES, args.model)}
        pred = predict_fusion(model.module, args._seq_models, dict(zip(SEQUENCES, images)), gland,
                              overwrite_streams=not args.keep_fusion_streams, batch_size=batch, threshold=threshold,
                              progress=progress, gland_labels=gland_labels)
    else:
        if len(images) != 1:
            raise ConfigError("without --fusion, give exactly one --image")
        pred = predict_sequence(model.module, images[0], gland, batch_size=batch, threshold=threshold,
                                progress=progress, gland_labels=gland_labels)
    meta["inputs"] = {"images": list(images), "gland": gland}
    meta["preprocessing"] = {**recipe_description(), "gland_source": pred.gland_source}
    return write_case(out_dir, "detection", pred.reference, {"likelihood": pred.prob, "gland": pred.gland}, meta,
                      threshold=threshold, names={"likelihood": "cancer_prob.nii.gz", "label": "cancer_label.nii.gz"})


def _report(out: str, side: dict) -> None:
    files = ", ".join(os.path.join(out, f) for f in side["outputs"].values())
    extra = ""
    if "case_score" in side:
        extra = f"; case score {side['case_score']:.4f}"
    if "probabilities" in side:
        extra = f"; class probabilities {[round(p, 4) for p in side['probabilities']]}"
    print(f"wrote {files or os.path.join(out, 'predictions.csv')}{extra}")
