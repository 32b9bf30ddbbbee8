"""The README's random-feature error tables: RMSE of RFF MMD^2 against the exact U-statistic, per F.

Two Gaussian samples of n = m = 500 rows, the second shifted along its first axis (0.5 at d = 16, 1.0 at
d = 768), the RBF kernel with the median-heuristic bandwidth; for each frequency count F and each kind of
frequencies (Gaussian, orthogonal, structured), the root-mean-square error over ``--seeds`` frequency seeds.
Prints Markdown tables in the README's form. Run: python scripts/bench/rff_error_table.py (about a minute).
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
from machine import describe

from vfm_align.align import exact_mmd2, median_sigma, mmd

KINDS = (("Gaussian RFF", False), ("orthogonal RF", True), ("structured (SORF)", "structured"))
SETTINGS = ((16, 0.5), (768, 1.0))  # (d, mean shift on one axis)


def samples(n: int, d: int, shift: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    y = rng.standard_normal((n, d)).astype(np.float32)
    y[:, 0] += shift
    return x, y


def error_table(d: int, shift: float, sizes, seeds: int, n: int) -> tuple[float, dict]:
    x, y = samples(n, d, shift)
    sigma = median_sigma(x, y)
    exact = exact_mmd2(x, y, [sigma])
    rmse = {}
    for label, orthogonal in KINDS:
        for f in sizes:
            vals = np.array([mmd(x, y, sigma=sigma, method="rff", num_features=f, seed=s, orthogonal=orthogonal)
                             for s in range(seeds)])
            rmse[label, f] = float(np.sqrt(np.mean((vals - exact) ** 2)))
    return exact, rmse


def sci(v: float, digits: int = 2) -> str:
    """1.6e-3 rather than 1.6e-03, as the README writes numbers."""
    mant, exp = f"{v:.{digits - 1}e}".split("e")
    return f"{mant}e{int(exp)}"


def markdown(sizes, rmse) -> str:
    lines = ["| F (frequencies) | " + " | ".join(str(f) for f in sizes) + " |",
             "|---|" + "---|" * len(sizes)]
    for label, _ in KINDS:
        lines.append(f"| {label} | " + " | ".join(sci(rmse[label, f]) for f in sizes) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024, 4096])
    args = ap.parse_args()
    print(describe(jax, np))
    for d, shift in SETTINGS:
        exact, rmse = error_table(d, shift, args.sizes, args.seeds, args.n)
        print(f"\nd = {d}: n = m = {args.n}, mean shift {shift} on one axis, median sigma, exact U = {sci(exact, 3)}; "
              f"root-mean-square error over {args.seeds} seeds\n")
        print(markdown(args.sizes, rmse))


if __name__ == "__main__":
    main()
