"""Numerical helpers that the oracle and the compiler side both use (neutral ground, like umc.dtypes)."""

from __future__ import annotations

import torch

CHUNK = 2**24  # elements examined at a time: bounds the transient memory of a check over a big tensor


def non_finite_count(tensor: torch.Tensor) -> int:
    """How many values of a floating tensor are NaN or +-Inf (0 for integer tensors), chunk by chunk.

    A chunk's largest magnitude is finite exactly when all its values are (NaN propagates through
    the maximum): that fast test runs first, and only a failing chunk is counted value by value.
    """
    if not tensor.is_floating_point():
        return 0
    flat = tensor.reshape(-1)
    count = 0
    for start in range(0, flat.numel(), CHUNK):
        chunk = flat[start:start + CHUNK]
        if not chunk.abs().amax().isfinite():
            count += int((~torch.isfinite(chunk)).sum())
    return count
