"""``vfm-align score``: how far fine-tuning moved a model's features (MMD^2, permutation p-value, CKA, drift)."""

from __future__ import annotations

import os
import time

from vfm_align.atomic import write_json

# --frequencies name -> the ``orthogonal`` argument of align.mmd / align.mmd_test.
FREQUENCIES = {"gaussian": False, "orthogonal": True, "structured": "structured"}


def register(sub) -> None:
    p = sub.add_parser(
        "score",
        help="score feature alignment between a model before and after fine-tuning (MMD^2, p-value, CKA, drift)",
        description=(
            "Extract the same features with two checkpoints of one architecture over a cohort (or read two "
            "precomputed banks), then report MMD^2 with its permutation p-value, linear CKA and per-input drift. "
            "Banks are written as memory-mapped .npy files with JSON provenance next to the results."
        ),
    )
    src = p.add_argument_group("inputs (models + cohort, or two banks)")
    src.add_argument("--before", metavar="DIR", help="model directory before fine-tuning")
    src.add_argument("--after", metavar="DIR", help="model directory after fine-tuning (same arch and config)")
    src.add_argument("--data", metavar="MANIFEST", help="cohort manifest (CSV or JSON)")
    src.add_argument("--split", default=None, choices=("train", "val", "test"),
                     help="use one split only (default: all)")
    src.add_argument("--cache", default=None, metavar="DIR",
                     help="preprocessing cache (default: .vfm_align_cache beside the manifest)")
    src.add_argument("--before-bank", metavar="NPY", help="precomputed bank (rows, width) instead of --before/--data")
    src.add_argument("--after-bank", metavar="NPY", help="precomputed bank instead of --after/--data")
    p.add_argument("--features", default="pooled", metavar="SITE",
                   help="feature site: pooled, cls or patch (patch tokens give one row per token); default pooled")
    p.add_argument("--layers", default=None, metavar="A,B,...",
                   help="also score these feature sites, one per layer (e.g. block0,block1 for ViTs, "
                        "stage0_block0,... for ProFound-Conv): MMD^2, CKA and drift per layer, without a p-value")
    p.add_argument("--method", default="rff", choices=("rff", "exact"), help="MMD computation (default rff)")
    p.add_argument("--estimator", default="unbiased", choices=("unbiased", "biased"))
    p.add_argument("--num-features", type=int, default=4096, help="random frequencies (rff; default 4096)")
    p.add_argument("--frequencies", default="gaussian", choices=tuple(FREQUENCIES),
                   help="rff frequencies: i.i.d. gaussian (default), orthogonal, or structured (SORF: orthogonal "
                        "accuracy, several times fewer multiply-adds; for banks of millions of rows)")
    p.add_argument("--sigma", default="median", help="RBF bandwidth: 'median' or a number (default median)")
    p.add_argument("--sigma-from", default="before", choices=("before", "pooled"),
                   help="bank the median heuristic is fitted on (default: before, so every checkpoint of a run "
                        "is scored with the same kernel)")
    p.add_argument("--permutations", type=int, default=1000, help="permutations for the p-value (0: no test)")
    p.add_argument("--pooled", action="store_true",
                   help="pooled-shuffle test even for paired banks (default: within-pair swaps when paired)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, metavar="DIR", help="write banks and score.json here")
    p.add_argument("--overwrite", action="store_true", help="replace existing banks / results in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def _check_same_model(before: str, after: str) -> dict:
    from vfm_align.errors import ConfigError
    from vfm_align.model_io import read_sidecar

    a, b = read_sidecar(before), read_sidecar(after)
    if a.get("arch") != b.get("arch"):
        raise ConfigError(f"--before {before} is '{a.get('arch')}' but --after {after} is '{b.get('arch')}': "
                          "score compares two checkpoints of the same architecture")
    if a.get("config") != b.get("config"):
        diff = sorted(k for k in set(a.get("config", {})) | set(b.get("config", {}))
                      if a.get("config", {}).get(k) != b.get("config", {}).get(k))
        raise ConfigError(f"--before {before} and --after {after} have different configs (keys: {', '.join(diff)})")
    return a


def _extract(model_dir, arch, cases, cache, site, path, provenance, args):
    import vfm_align
    from vfm_align.align import extract_bank
    from vfm_align.align.banks import fit_sample, model_feature_fn

    model = vfm_align.load(model_dir)
    features = model_feature_fn(model, arch, (site,))

    def fn(sample):
        return features(fit_sample(sample, model, arch)["image"])

    samples = ({**cache.get(c), "case_id": c.case_id} for c in cases)
    return extract_bank(fn, _Sized(samples, len(cases)), path, site=site, provenance=provenance,
                        overwrite=args.overwrite, progress=not args.quiet)


class _Sized:
    """An iterator with a length, so the progress bar knows the total."""

    def __init__(self, it, n):
        self.it, self.n = it, n

    def __iter__(self):
        return iter(self.it)

    def __len__(self):
        return self.n


def _banks_from_models(args, out_dir, timings, site=None):
    import tempfile

    from vfm_align.data.cache import PreprocessCache
    from vfm_align.data.cohort import read_manifest
    from vfm_align.errors import ConfigError, DataError

    if not (args.before and args.after and args.data):
        raise ConfigError("give --before, --after and --data, or --before-bank and --after-bank")
    site = site or args.features
    meta = _check_same_model(args.before, args.after)
    cohort = read_manifest(args.data)
    cases = cohort.split(args.split) if args.split else list(cohort.cases)
    if not cases:
        raise DataError(f"{args.data}: no cases{' in split ' + args.split if args.split else ''}")
    cache_dir = args.cache or os.path.join(os.path.dirname(os.path.abspath(args.data)), ".vfm_align_cache")
    cache = PreprocessCache(cache_dir)
    bank_dir = out_dir or tempfile.mkdtemp(prefix="vfm_align_banks_")
    banks = []
    for role, model_dir in (("before", args.before), ("after", args.after)):
        t0 = time.perf_counter()
        prov = {"model": os.path.abspath(model_dir), "arch": meta["arch"], "config": meta.get("config"),
                "cohort": os.path.abspath(args.data), "split": args.split, "cases": [c.case_id for c in cases]}
        banks.append(_extract(model_dir, meta["arch"], cases, cache, site,
                              os.path.join(bank_dir, f"{role}_{site}.npy"), prov, args))
        timings[f"extract_{role}_s"] = timings.get(f"extract_{role}_s", 0.0) + time.perf_counter() - t0
    return banks[0], banks[1]


def run(args) -> int:
    from vfm_align.align import linear_cka, median_sigma, mmd, mmd_test, open_bank, paired_drift
    from vfm_align.errors import ConfigError

    timings = {}
    out_dir = os.path.abspath(args.out) if args.out else None
    if out_dir:
        res_path = os.path.join(out_dir, "score.json")
        if os.path.exists(res_path) and not args.overwrite:
            raise ConfigError(f"{res_path} already exists (pass --overwrite to replace it)")
        os.makedirs(out_dir, exist_ok=True)
    if args.before_bank or args.after_bank:
        if not (args.before_bank and args.after_bank):
            raise ConfigError("--before-bank and --after-bank go together")
        if args.before or args.after or args.data:
            raise ConfigError("give either banks (--before-bank/--after-bank) or models with --data, not both")
        if args.layers:
            raise ConfigError("--layers extracts features from models: give --before, --after and --data")
        before, after = open_bank(args.before_bank), open_bank(args.after_bank)
    else:
        before, after = _banks_from_models(args, out_dir, timings)
    x, y = before.data, after.data
    if x.shape[1] != y.shape[1]:
        from vfm_align.errors import DataError

        raise DataError(f"banks {before.path} and {after.path} have different widths: {x.shape[1]} vs {y.shape[1]}")
    paired = x.shape[0] == y.shape[0] and not args.pooled

    t0 = time.perf_counter()
    if args.sigma == "median":
        sigma = median_sigma(x, None if args.sigma_from == "before" else y, seed=args.seed)
    else:
        try:
            sigma = float(args.sigma)
        except ValueError:
            raise ConfigError(f"--sigma must be 'median' or a number, got '{args.sigma}'") from None
    timings["bandwidth_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    orthogonal = FREQUENCIES[args.frequencies]
    value = mmd(x, y, sigma=sigma, estimator=args.estimator, method=args.method, num_features=args.num_features,
                seed=args.seed, orthogonal=orthogonal)
    timings["mmd_s"] = time.perf_counter() - t0
    result = {
        "before": before.path, "after": after.path, "site": before.provenance.get("site", args.features),
        "n_before": int(x.shape[0]), "n_after": int(y.shape[0]), "d": int(x.shape[1]),
        "method": args.method, "estimator": args.estimator, "kernel": "rbf", "sigma": sigma,
        "sigma_rule": f"median of off-diagonal d^2 / 2 over {args.sigma_from}" if args.sigma == "median" else "fixed",
        "num_features": args.num_features if args.method == "rff" else None,
        "frequencies": args.frequencies if args.method == "rff" else None, "seed": args.seed,
        "mmd2": value,
    }
    if args.permutations > 0:
        t0 = time.perf_counter()
        test = mmd_test(x, y, args.permutations, paired=paired, sigma=sigma, estimator=args.estimator,
                        method=args.method, num_features=min(args.num_features, 2048), seed=args.seed,
                        orthogonal=orthogonal)
        timings["test_s"] = time.perf_counter() - t0
        result.update({"p_value": test.p_value, "test": "paired swaps" if paired else "pooled shuffle",
                       "num_permutations": args.permutations, "test_statistic": test.statistic})
    if x.shape[0] == y.shape[0]:
        t0 = time.perf_counter()
        result["cka"] = linear_cka(x, y)
        result.update(paired_drift(x, y))
        timings["paired_s"] = time.perf_counter() - t0
    if args.layers:
        t0 = time.perf_counter()
        result["layers"] = _layer_scores(args, out_dir, timings, {args.features: (before, after)})
        timings["layers_s"] = time.perf_counter() - t0
    result["timings"] = timings
    if out_dir:
        write_json(res_path, result)
    _print_table(result)
    if out_dir:
        print(f"wrote {res_path}")
    return 0


def _layer_scores(args, out_dir, timings, done: dict) -> dict:
    """MMD^2 (same estimator and frequencies, the bandwidth fitted per layer), CKA and drift per layer site;
    ``done``: site -> (before, after) banks already extracted in this run."""
    from vfm_align.align import median_sigma, mmd, paired_measures
    from vfm_align.errors import ConfigError

    sites = [s.strip() for s in args.layers.split(",") if s.strip()]
    if not sites:
        raise ConfigError(f"--layers: no site names in '{args.layers}'")
    out = {}
    for site in sites:
        before, after = done[site] if site in done else _banks_from_models(args, out_dir, timings, site=site)
        x, y = before.data, after.data
        sigma = median_sigma(x, None if args.sigma_from == "before" else y, seed=args.seed)
        out[site] = {"n": int(x.shape[0]), "d": int(x.shape[1]), "sigma": sigma,
                     "mmd2": mmd(x, y, sigma=sigma, estimator=args.estimator, method=args.method,
                                 num_features=args.num_features, seed=args.seed,
                                 orthogonal=FREQUENCIES[args.frequencies]),
                     **paired_measures(x, y)}
    return out


def _print_table(r: dict) -> None:
    rows = [("site", r["site"]), ("n (before / after)", f"{r['n_before']} / {r['n_after']}"), ("d", r["d"]),
            ("MMD^2 (" + r["estimator"] + ", " + r["method"] + ")", f"{r['mmd2']:.6g}"),
            ("sigma", f"{r['sigma']:.6g} ({r['sigma_rule']})")]
    if "p_value" in r:
        rows.append(("p-value", f"{r['p_value']:.4g} ({r['test']}, {r['num_permutations']} permutations)"))
    if "cka" in r:
        rows += [("linear CKA", f"{r['cka']:.6f}"), ("mean cosine", f"{r['mean_cosine']:.6f}"),
                 ("mean L2", f"{r['mean_l2']:.6g}")]
    for site, m in r.get("layers", {}).items():
        rows.append((f"layer {site}", f"MMD^2 {m['mmd2']:.6g}  CKA {m['cka']:.6f}  (n {m['n']}, d {m['d']})"))
    rows += [(k.replace("_s", " (s)"), f"{v:.2f}") for k, v in r["timings"].items()]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
