from __future__ import annotations

import torch

from . import symmetric_part


def jtj(J: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """G = J^T diag(w) J.  J [..., D, d], weight [..., D] or [D] or None -> G [..., d, d], exactly symmetric."""
    weighted = J if weight is None else J * weight.unsqueeze(-1)
    return symmetric_part(weighted.transpose(-1, -2) @ J)
