"""``vfm-align phantom``: write the synthetic prostate mpMRI cohort (NIfTI + manifest)."""

from __future__ import annotations


def _shape(text: str):
    from vfm_align.errors import ConfigError

    try:
        parts = tuple(int(p) for p in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3:
        raise ConfigError(f"--shape expects D,H,W (three integers), got '{text}'")
    return parts


def register(sub) -> None:
    p = sub.add_parser(
        "phantom",
        help="write a synthetic prostate mpMRI cohort (T2w, ADC, DWI, zones, graded lesions) with a manifest",
        description=(
            "Generate a seeded, procedural prostate mpMRI cohort as NIfTI files plus manifest.csv "
            "(train/val/test splits, csPCa and ISUP grade labels). Cases are made in parallel processes; "
            "the write is atomic, and re-running the same command into a finished folder does nothing."
        ),
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--cases", type=int, default=200, help="number of cases (default 200)")
    p.add_argument("--shape", type=str, default="32,96,96",
                   help="grid D,H,W (default 32,96,96; fixed 80x96x96 mm field of view)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="worker processes (default: all CPU cores)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing folder made with other settings")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from vfm_align.data.phantom import make_phantom

    manifest = make_phantom(args.out, args.cases, shape=_shape(args.shape), seed=args.seed, workers=args.workers,
                            progress=not args.quiet, overwrite=args.overwrite)
    print(f"phantom cohort: {manifest}")
    return 0
