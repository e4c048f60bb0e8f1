"""Deterministic launch settings shared by the Triton kernels (no autotuning: the interpreter cannot autotune, and a
fixed choice keeps results reproducible)."""
from __future__ import annotations

import triton


def block_for(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= n and >= minimum (tl.dot needs tiles of at least 16)."""
    return max(minimum, triton.next_power_of_2(max(int(n), 1)))

