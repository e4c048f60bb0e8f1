"""Pure-PyTorch references: the CPU fallback, the test oracle and the benchmark baseline of every op."""
import torch


def symmetric_part(A: torch.Tensor) -> torch.Tensor:
    """(A + A^T) / 2 over the last two indices [..., n, n]: symmetric to the bit by construction, since a + b == b + a
    in floating point. A matrix product whose two triangles are separate dot products is not: BLAS libraries round them
    differently on some CPUs (seen on AMD EPYC), and Cholesky-based code downstream expects an exact mirror.
    Halved before the sum (the same bits for normal numbers): A + A^T overflows where A's entries exceed half the
    dtype's maximum, and a representable G became inf."""
    half = 0.5 * A
    return half + half.transpose(-1, -2)


def hermitian_part(A: torch.Tensor) -> torch.Tensor:
    """(A + A^H) / 2 over the last two indices [..., n, n]: Hermitian to the bit (a real diagonal, mirrored
    conjugates), for the same reasons as symmetric_part (halved before the sum)."""
    half = 0.5 * A
    return half + half.transpose(-1, -2).conj_physical()
