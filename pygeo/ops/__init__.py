"""Low-level fused operations on tensors. Each is a torch.library custom op (pygeo::<name>) with a fake
implementation and an autograd formula, dispatched to a backend by pygeo._backend."""
from .jtj import jtj

__all__ = ["jtj"]
from .lse_kahler_metric import lse_kahler_metric
__all__ += ["lse_kahler_metric"]
