"""The static sizes a skip-compute branch runs at when the kept count is traced (JAX under
`jax.jit`: shapes are static, the count is data-dependent); framework-free (docs/design.md,
"Skipping dropped samples").
"""

from __future__ import annotations

import functools
import math
import numbers

import numpy as np

from ._op import OpConfig

__all__ = ["DEFAULT_BUCKETS", "bucket_sizes", "check_buckets"]

DEFAULT_BUCKETS = 4


def check_buckets(buckets):
    """`buckets` as the caller gives it: a count (an int >= 1, returned as an int) or a
    sequence of sizes >= 1 (returned as a tuple)."""
    if isinstance(buckets, (bool, np.bool_)):
        raise TypeError("buckets must be a positive integer (how many sizes) or a sequence of "
                        "sizes, got bool")
    if isinstance(buckets, numbers.Integral):
        if buckets < 1:
            raise ValueError(f"buckets must be at least 1, got {buckets}")
        return int(buckets)
    try:
        sizes = list(buckets)
    except TypeError:
        raise TypeError("buckets must be a positive integer (how many sizes) or a sequence of "
                        f"sizes, got {type(buckets).__name__}") from None
    if not sizes:
        raise ValueError("buckets must name at least one size, got an empty sequence")
    for size in sizes:
        if isinstance(size, (bool, np.bool_)) or not isinstance(size, numbers.Integral):
            raise TypeError(f"buckets sizes must be integers, got {type(size).__name__}")
        if size < 1:
            raise ValueError(f"buckets sizes must be >= 1, got {size}")
    return tuple(int(s) for s in sizes)


@functools.lru_cache(maxsize=256)
def _binomial_quantiles(n, p, count):
    """The smallest k with P(Binomial(n, p) <= k) >= i / count, for i = 1 .. count - 1."""
    lp, lq, ln = math.log(p), math.log1p(-p), math.lgamma(n + 1)
    out, cdf, k = [], 0.0, 0
    for i in range(1, count):
        while k < n:
            term = math.exp(ln - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * lp
                            + (n - k) * lq)
            if cdf + term >= i / count:
                break
            cdf += term
            k += 1
        out.append(k)
    return tuple(out)


def bucket_sizes(batch, survival_prob, buckets=DEFAULT_BUCKETS, mode="row"):
    """The static sizes the branch runs at when the kept count is traced, ascending; the last is
    `batch`. (A count of 0 runs no branch at all.)

    `buckets` a sequence: those of its sizes below `batch`, and `batch` (so one setting serves
    a last, smaller batch too). `buckets` an integer k: in "row" mode the kept count is
    Binomial(batch, p) (the draws are uniform 32-bit words), so the sizes are its quantiles at
    1/k, 2/k, ..., (k - 1)/k and `batch`, without duplicates or 0: each size is the bucket of
    about 1/k of the calls, and the padding stays within the spread of the count around
    p * batch rather than a fixed fraction of the batch. In "batch" mode the count is 0 or
    `batch`, and with p = 1 it is `batch`: one size. With p = 0 (or no samples) nothing is ever
    kept: no size.
    """
    config = OpConfig(survival_prob, mode)
    batch = _check_batch(batch)
    buckets = check_buckets(buckets)
    if batch == 0 or config.survival_prob == 0.0:
        return ()  # nothing is ever kept
    if config.batch_mode or config.survival_prob == 1.0:
        return (batch,)  # all or nothing
    if isinstance(buckets, int):
        sizes = _binomial_quantiles(batch, config.survival_prob, buckets)
    else:
        sizes = buckets
    return tuple(sorted({s for s in sizes if 0 < s < batch} | {batch}))


def _check_batch(value):
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"batch must be an integer, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"batch must be >= 0, got {value}")
    return int(value)
