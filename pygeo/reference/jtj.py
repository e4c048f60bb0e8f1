from __future__ import annotations

import torch


def jtj(J: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """G = J^T diag(w) J.  J [..., D, d], weight [..., D] or [D] or None -> G [..., d, d], exactly symmetric."""
    weighted = J if weight is None else J * weight.unsqueeze(-1)
    G = weighted.transpose(-1, -2) @ J
    return 0.5 * (G + G.transpose(-1, -2))
