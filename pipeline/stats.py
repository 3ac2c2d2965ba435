"""Small statistics for reporting rates measured on a finite sample of images.

    from pipeline.stats import wilson_interval
    lo, hi = wilson_interval(157, 300)   # certified 157 of 300 validation images: 95% interval

A certified (or natural) accuracy measured on n images is a binomial proportion; the Wilson score
interval is used because it stays inside [0, 1] and behaves well at 0 % and 100 %, where the
normal-approximation interval collapses to a point.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


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


# --------------------------------------------------------------------------------------------
# Paired comparisons of two nets on the same images (per-image outcomes as bool vectors).


def _binom_tail_ge(k: int, n: int) -> float:
    """P(X >= k) for X ~ Binomial(n, 1/2), exact."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    return sum(math.comb(n, i) for i in range(k, n + 1)) / 2.0**n


def discordant(a: Sequence[bool], b: Sequence[bool]) -> tuple[int, int]:
    """``(only_a, only_b)``: images where only ``a`` succeeded, and only ``b``."""
    if len(a) != len(b):
        raise ValueError(f"paired outcomes need equal lengths, got {len(a)} and {len(b)}")
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    return only_a, only_b


def mcnemar_exact(only_a: int, only_b: int, alternative: str = "two-sided") -> float:
    """Exact McNemar (sign) test p-value on the discordant pairs.

    ``alternative``: "two-sided"; "greater" (a succeeds more often than b); "less" (a succeeds
    less often than b). Under H0 each discordant image is equally likely to favour a or b, so
    ``only_a ~ Binomial(only_a + only_b, 1/2)``. No discordant pairs gives p = 1.
    """
    if only_a < 0 or only_b < 0:
        raise ValueError(f"mcnemar_exact: counts must be >= 0, got {only_a}, {only_b}")
    n = only_a + only_b
    if n == 0:
        return 1.0
    if alternative == "greater":
        return _binom_tail_ge(only_a, n)
    if alternative == "less":
        return _binom_tail_ge(only_b, n)
    if alternative != "two-sided":
        raise ValueError(f"alternative = {alternative!r}: allowed two-sided, greater, less")
    return min(1.0, 2.0 * _binom_tail_ge(max(only_a, only_b), n))


def sign_test(a: Sequence[bool], b: Sequence[bool], alternative: str = "two-sided") -> float:
    """Exact sign test of paired per-image outcomes ``a`` vs ``b`` (McNemar on the discordant)."""
    return mcnemar_exact(*discordant(a, b), alternative=alternative)


def paired_difference(a: Sequence[bool], b: Sequence[bool], z: float = 1.96
                      ) -> dict[str, float]:
    """Rate of ``a`` minus rate of ``b`` on the same images, with a Wald interval of the paired
    difference (variance from the discordant pairs) and the two-sided exact McNemar p-value.

    Returns ``{"n", "diff", "lo", "hi", "only_a", "only_b", "p"}``.
    """
    only_a, only_b = discordant(a, b)
    n = len(a)
    if n == 0:
        return {"n": 0, "diff": 0.0, "lo": -1.0, "hi": 1.0, "only_a": 0, "only_b": 0, "p": 1.0}
    diff = (only_a - only_b) / n
    var = max(0.0, (only_a + only_b) / n - diff * diff) / n
    half = z * math.sqrt(var)
    return {"n": n, "diff": diff, "lo": max(-1.0, diff - half), "hi": min(1.0, diff + half),
            "only_a": only_a, "only_b": only_b, "p": mcnemar_exact(only_a, only_b)}


# --------------------------------------------------------------------------------------------
# Compact storage of per-image outcomes (Optuna user attributes are JSON).


def pack_bits(values: Sequence[bool]) -> dict[str, Any]:
    """``{"n": len, "b64": base64 of the packed bits}`` (numpy packbits, big-endian bit order)."""
    import base64

    import numpy as np

    arr = np.asarray([bool(v) for v in values], dtype=bool)
    return {"n": int(arr.size), "b64": base64.b64encode(np.packbits(arr).tobytes()).decode()}


def unpack_bits(packed: dict[str, Any]) -> list[bool]:
    """Inverse of :func:`pack_bits`."""
    import base64

    import numpy as np

    raw = np.frombuffer(base64.b64decode(packed["b64"]), dtype=np.uint8)
    return np.unpackbits(raw)[: int(packed["n"])].astype(bool).tolist()


def paired_launches(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Paired difference (a − b) of two launch entries (study attribute ``launches``) on the same
    test images, from their ``test_cert_bits``: :func:`paired_difference` of the outcomes."""
    ba, bb = a.get("test_cert_bits"), b.get("test_cert_bits")
    if not ba or not bb:
        raise ValueError("both launches need per-image test outcomes (test_cert_bits)")
    if ba.get("first_index", 0) != bb.get("first_index", 0) or ba["n"] != bb["n"]:
        raise ValueError(f"the launches certified different test images ({ba['n']} from "
                         f"{ba.get('first_index', 0)} vs {bb['n']} from {bb.get('first_index', 0)})")
    return paired_difference(unpack_bits(ba), unpack_bits(bb))


__all__ = ["wilson_interval", "discordant", "mcnemar_exact", "sign_test", "paired_difference",
           "pack_bits", "unpack_bits", "paired_launches"]
