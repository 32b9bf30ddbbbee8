"""``vfm-align study``: pretrain, fine-tune every (backbone, task) and report how alignment predicts transfer."""

from __future__ import annotations

from vfm_align.cli import accept_config_overrides


def register(sub) -> None:
    p = sub.add_parser("study", help="run (or resume) the transfer study and write its report",
                       description="Fine-tune each backbone on each task from pretrained and random weights, record "
                                   "gains, convergence and in-loop alignment, correlate them, and write results.json, "
                                   "results.csv, figures/ and report.html. Re-running resumes; same seed, same "
                                   "numbers.")
    p.add_argument("--config", default=None, help="study recipe (default: configs/study_default.py)")
    p.add_argument("--quick", action="store_true", help="use configs/study_quick.py (a minutes-long run)")
    p.add_argument("--out", default="study_out", help="output folder (default: ./study_out)")
    p.add_argument("--overwrite", action="store_true",
                   help="the output folder holds results of another config or cohort: recompute what the changes "
                        "affect (without it the study refuses, naming the changed keys)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    p.epilog = ("Overrides: --config.KEY=VALUE (repeatable; typed like the value it replaces), e.g. "
                "--config.finetune.steps=100 --config.backbones.0.weights=DIR")
    accept_config_overrides(p)


def run(args) -> int:
    from vfm_align.config_file import default_config_path, load_config
    from vfm_align.study.runner import run_study

    path = args.config or default_config_path("study_quick" if args.quick else "study_default")
    cfg = load_config(path, args.overrides)
    results = run_study(cfg, args.out, progress=not args.no_progress, overwrite=args.overwrite)
    print(results["finding"])
    print(f"report: {args.out}/report.html")
    return 0
