"""How much pretraining helped one (backbone, task, seed): gains that mean the same on every task.

Design note. The study correlates alignment with gain across tasks whose metrics live on different
scales (AUROC, Dice, PI-CAI score, SSIM, NCC), so the primary gain is the fraction of the gap to the
metric's ceiling that pretraining closes:

    gap_closed = (pre - rand) / (ceiling - rand)

with ``ceiling`` the metric's best attainable value. The formula needs no sign convention: for a
lower-is-better metric both numerator and denominator change sign. It is 1 when pretraining reaches
the ceiling, 0 when it ties the random-init baseline, negative when it does worse (unbounded below,
by design: doing worse than random init from a better-than-random baseline is not clipped away).
Degenerate cases have defined values and a flag: a baseline already at the ceiling gives 0 ("random
at ceiling"), a metric without a finite ceiling gives NaN ("no ceiling"). A value on the wrong side
of the ceiling is a bad metric and raises.

The old relative gain, (pre - rand) / max(|rand|, floor), is kept as a secondary column; the floor
keeps a baseline that learned nothing (metric ~ 0) from turning it into an arbitrarily large number.
"""

from __future__ import annotations

import math

from vfm_align.errors import DataError

RANDOM_AT_CEILING = "random at ceiling"
NO_CEILING = "no ceiling"


def gap_closed(pre: float, rand: float, ceiling: float | None, higher_is_better: bool = True,
               *, tol: float = 1e-12) -> tuple[float, str | None]:
    """(pre - rand) / (ceiling - rand) and a flag (None, :data:`RANDOM_AT_CEILING` or :data:`NO_CEILING`)."""
    pre, rand = float(pre), float(rand)
    if ceiling is None or not math.isfinite(float(ceiling)):
        return float("nan"), NO_CEILING
    ceiling = float(ceiling)
    sign = 1.0 if higher_is_better else -1.0
    slack = tol * max(1.0, abs(ceiling))
    for name, v in (("pretrained", pre), ("random-init", rand)):
        if sign * (v - ceiling) > slack:
            raise DataError(f"{name} metric {v!r} is beyond its ceiling {ceiling!r} "
                            f"({'higher' if higher_is_better else 'lower'} is better)")
    gap = ceiling - rand
    if abs(gap) <= slack:
        return 0.0, RANDOM_AT_CEILING
    return (pre - rand) / gap, None


def relative_gain(pretrained: float, random: float, floor: float, higher_is_better: bool = True) -> float:
    """(pretrained - random) / max(|random|, floor), signed so that positive means pretraining helped."""
    sign = 1.0 if higher_is_better else -1.0
    return sign * (float(pretrained) - float(random)) / max(abs(float(random)), float(floor))
