"""Small statistics for reporting rates measured on a finite sample of images.

    from pipeline.stats import wilson_interval
    lo, hi = wilson_interval(157, 300)   # certified 157 of 300 validation images: 95% interval

A certified (or natural) accuracy measured on n images is a binomial proportion; the Wilson score
interval is used because it stays inside [0, 1] and behaves well at 0 % and 100 %, where the
normal-approximation interval collapses to a point.
"""

from __future__ import annotations

import math


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval ``(lo, hi)`` of the proportion ``successes / n``.

    ``z`` is the standard-normal quantile of the two-sided level (1.96: 95 %). ``n == 0`` gives
    the uninformative ``(0.0, 1.0)``. Raises ValueError unless ``0 <= successes <= n``.
    """
    if n < 0 or successes < 0 or successes > n:
        raise ValueError(f"wilson_interval: need 0 <= successes <= n, got {successes} of {n}")
    if not z > 0:
        raise ValueError(f"wilson_interval: z = {z}: must be > 0")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # Clamp float rounding only; the exact interval lies in [0, 1] and contains p.
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


__all__ = ["wilson_interval"]
