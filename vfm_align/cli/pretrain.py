"""``vfm-align pretrain``: pretrain a backbone with masked reconstruction (MAE on the ViT, FCMAE on the
ConvNeXt-V2) or patch contrastive learning."""

from __future__ import annotations

from vfm_align.cli import accept_config_overrides


def register(sub) -> None:
    p = sub.add_parser("pretrain", help="pretrain a backbone (MAE, FCMAE or contrastive) and save a model directory",
                       description="Pretrain with a recipe from configs/pretrain_*.py on its cohort (the phantom, "
                                   "generated beside the output when cohort.manifest is empty). The output loads with "
                                   "vfm_align.load() (for FCMAE: the ConvNeXt-V2 encoder, without the decoder).")
    p.add_argument("--config", required=True,
                   help="pretraining recipe, e.g. configs/pretrain_mae.py or configs/pretrain_fcmae.py")
    p.add_argument("--out", required=True, help="output model directory (must not exist)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
    p.epilog = "Overrides: --config.KEY=VALUE (repeatable), e.g. --config.steps=200 --config.optim.lr=5e-4"
    accept_config_overrides(p)


def run(args) -> int:
    import os

    import numpy as np

    from vfm_align.config_file import load_config
    from vfm_align.errors import CheckpointError
    from vfm_align.study import taskdata
    from vfm_align.study.pretrain import pretrain

    cfg = load_config(args.config, args.overrides)
    if os.path.exists(args.out):
        raise CheckpointError(f"{args.out}: already exists")
    manifest = cfg.cohort.manifest
    if not manifest:
        from vfm_align.data.phantom import make_phantom

        manifest = make_phantom(os.path.abspath(args.out) + "_cohort", int(cfg.cohort.cases),
                                shape=tuple(cfg.cohort.shape), seed=int(cfg.seed), workers=1, progress=False)
    cohort = taskdata.load_cohort(manifest, crop=tuple(cfg.cohort.crop) if cfg.cohort.get("crop") else None)
    train = cohort["split"] == "train"
    data = {"image": cohort["image"][train], "cancer": (cohort["lesion"][train] > 0).astype(np.int32)}
    info = pretrain(cfg, data, args.out, progress=not args.no_progress)
    print(f"pretrained {cfg.backbone} with {cfg.objective} for {info['steps']} steps -> {args.out} "
          f"(loss {info['curve'][0]['loss']:.4f} -> {info['curve'][-1]['loss']:.4f})")
    return 0
