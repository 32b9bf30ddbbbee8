"""``vfm-align infer``: ProViCNet cancer maps for one NIfTI sequence, or T2 + ADC + DWI through the fusion model."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser(
        "infer",
        help="segment csPCa/indolent cancer in a prostate MRI volume with converted ProViCNet models",
        description=(
            "Apply the ProViCNet reference preprocessing (gland-mask z-score, 2.5D 3-slice stacks, 448 px slices) and "
            "write cancer_prob.nii.gz (p(indolent) + p(csPCa)) and cancer_label.nii.gz (prob > threshold) on the "
            "input grid. One sequence: --model DIR --image IMG. Fusion: --fusion DIR with --model and --image given "
            "three times each, in the order T2, ADC, DWI. The model predicts 256x256 in-plane (0.5 mm); other "
            "in-plane sizes are resized bilinearly back to the input grid."
        ),
    )
    p.add_argument("--model", nargs="+", required=True, metavar="DIR",
                   help="per-sequence model directory (three for fusion: T2 ADC DWI)")
    p.add_argument("--image", nargs="+", required=True, metavar="NIFTI",
                   help="image volume (three for fusion: T2 ADC DWI, on one grid)")
    p.add_argument("--gland", required=True, metavar="NIFTI", help="gland mask (1 inside the prostate), same grid")
    p.add_argument("--fusion", metavar="DIR", default=None, help="fusion model directory (enables the mpMRI path)")
    p.add_argument("--keep-fusion-streams", action="store_true",
                   help="use the fusion checkpoint's own stream weights instead of the per-sequence heads "
                        "(the reference inference overwrites them)")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--threshold", type=float, default=0.4, help="cancer label threshold (default 0.4)")
    p.add_argument("--batch-size", type=int, default=8, help="slices per device batch (default 8)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from vfm_align.errors import ConfigError
    from vfm_align.infer.provicnet import (SEQUENCES, output_paths, predict_fusion, predict_sequence,
                                          write_prediction)

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    output_paths(args.out, overwrite=args.overwrite)  # refuse before spending time on inference
    if args.fusion:
        if len(args.model) != 3 or len(args.image) != 3:
            raise ConfigError("fusion needs --model and --image three times each, in the order T2 ADC DWI")
        pred = predict_fusion(args.fusion, dict(zip(SEQUENCES, args.model)), dict(zip(SEQUENCES, args.image)),
                              args.gland, overwrite_streams=not args.keep_fusion_streams,
                              batch_size=args.batch_size, threshold=args.threshold, progress=not args.quiet)
    else:
        if len(args.model) != 1 or len(args.image) != 1:
            raise ConfigError("without --fusion, give exactly one --model and one --image")
        pred = predict_sequence(args.model[0], args.image[0], args.gland, batch_size=args.batch_size,
                                threshold=args.threshold, progress=not args.quiet)
    paths = write_prediction(pred, args.out, overwrite=args.overwrite)
    n = int(pred.label.sum())
    print(f"wrote {paths['prob']} and {paths['label']} ({n} voxels above {pred.threshold})")
    return 0
