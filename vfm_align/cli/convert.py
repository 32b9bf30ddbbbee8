"""``vfm-align convert``: a PyTorch checkpoint -> an Orbax model directory, without running pickled code."""

from __future__ import annotations

from vfm_align.cli import accept_config_overrides


def register(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a PyTorch checkpoint (.pth, .pth.tar, .safetensors) to a vfm-align model directory",
        description=(
            "Read a ProFound or ProViCNet checkpoint safely (no torch, no pickled code executed), infer the "
            "architecture and its sizes from the weights, and write an Orbax checkpoint plus a JSON sidecar "
            "(config, source sha256, key report). The write is atomic."
        ),
    )
    p.add_argument("src", help="source checkpoint file")
    p.add_argument("--out", required=True, help="output model directory (must not exist unless --overwrite)")
    p.add_argument("--arch", default=None, help="architecture name; inferred from the keys when omitted")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.set_defaults(func=run)
    p.epilog = ("Overrides: --config.KEY=VALUE for a config value the weights cannot tell, e.g. --config.num_heads=6 "
                "(repeatable; Python or JSON literals, else text; an unknown key is an error)")
    accept_config_overrides(p)


def _parse_overrides(items):
    from vfm_align.config_file import parse_value
    from vfm_align.errors import ConfigError

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or "." in key:
            raise ConfigError(f"--config.KEY=VALUE expects a top-level model config key, got '{item}'")
        out[key] = parse_value(value)
    return out


def run(args) -> int:
    from converters import from_pytorch
    from vfm_align.model_io import save_model

    model, info = from_pytorch(args.src, arch=args.arch, **_parse_overrides(args.overrides))
    config = info.pop("config")
    out = save_model(model, info["arch"], config, args.out, extra={"provenance": info}, overwrite=args.overwrite)
    print(f"converted {args.src} -> {out}")
    print(f"  arch {info['arch']}; {len(info['used'])} keys used, {len(info['ignored'])} ignored; "
          f"sha256 {info['sha256'][:16]}…")
    for key, why in list(info["ignored"].items())[:10]:
        print(f"  ignored {key}: {why}")
    if len(info["ignored"]) > 10:
        print(f"  … and {len(info['ignored']) - 10} more ignored keys (see the sidecar)")
    return 0
