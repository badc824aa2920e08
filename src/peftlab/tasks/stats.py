"""The statistics of task accuracy: a Wilson interval for one accuracy, an exact McNemar test
for the difference between two strategies scored on the same items.

Wilson (1927): for k correct of n at confidence z (1.96 for 95%),
    centre = (p + z²/2n) / (1 + z²/n),  half = z·sqrt(p(1−p)/n + z²/4n²) / (1 + z²/n),  p = k/n.
Unlike p ± z·sqrt(p(1−p)/n) it stays inside [0, 1] and is not empty at p = 0 or 1.

McNemar, exact: on paired items only the discordant ones carry information — b items right
under A and wrong under B, c the other way round. Under H0 (equal accuracy) each discordant
item is a fair coin, so b ~ Binomial(b + c, 1/2); the two-sided p-value is
    min(1, 2 · P[X ≤ min(b, c)]),  X ~ Binomial(b + c, 1/2).
"""

import math


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """(low, high) of the Wilson score interval for k successes in n trials."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar(a: list[bool], b: list[bool]) -> dict:
    """Paired comparison of two per-item correctness lists over the same items."""
    if len(a) != len(b):
        raise ValueError("McNemar needs the same items scored both ways")
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    n = only_a + only_b
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2**n if n else 1.0
    return {"n": len(a), "only_a": only_a, "only_b": only_b,
            "difference": (sum(a) - sum(b)) / len(a) if a else 0.0, "p_value": min(1.0, 2 * tail)}
