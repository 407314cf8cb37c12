"""Tolerances derived from float32 rounding, for comparisons that are not bitwise deterministic by construction.

Every bound here holds for any summation order and any blocking a kernel may choose, so a test that uses it
passes or fails the same way on every machine and at every thread count. Each bound is a worst case: it
is loose by design, and it still rejects the mistakes the tests look for (a missing square root, a wrong
scale, a wrong average), which are wrong by a factor, not by a few roundings.
"""

from __future__ import annotations

#: Unit roundoff of float32: the largest relative error of one correctly rounded operation.
FP32_UNIT_ROUNDOFF = 2.0**-24


def fp32_sum_rtol(num_terms: int, extra_operations: int = 0) -> float:
    """Relative error bound of a float32 sum of ``num_terms`` non-negative terms, in any order.

    Any order of summation performs ``n - 1`` roundings on a path no longer than ``n - 1`` additions, so the
    relative error is at most ``(n - 1) u / (1 - (n - 1) u)``. ``extra_operations`` adds one ``u`` for each
    further rounded operation on the result (a division, a square root, a square).
    """
    steps = max(num_terms - 1, 0) + extra_operations
    return steps * FP32_UNIT_ROUNDOFF / (1 - steps * FP32_UNIT_ROUNDOFF)


def fp32_softmax_rtol(num_values: int, max_abs_logit: float, input_operations: int = 2) -> float:
    """Relative error bound of each entry of a float32 softmax, against the exact softmax of the exact inputs.

    The logits themselves carry ``input_operations`` roundings (for example a normalisation and a division
    by the temperature), a relative error of at most ``input_operations * u``. ``exp`` turns an absolute
    error ``|x| * d`` of its argument into a relative error of the same size, so each exponential is off by
    at most ``(2 * max|x| * input_operations + 2) u`` (shifting by the maximum doubles the largest argument,
    and float32 ``exp`` is accurate to 2 u). The normalising sum adds ``(L - 1) u`` and the division ``u``.
    """
    exponent = 2 * max_abs_logit * input_operations + 2
    return (exponent + num_values) * FP32_UNIT_ROUNDOFF
