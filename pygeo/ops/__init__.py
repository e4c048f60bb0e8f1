"""Low-level fused operations on tensors. Each is a torch.library custom op (pygeo::<name>) with a fake
implementation and an autograd formula, dispatched to a backend by pygeo._backend."""
from .jtj import jtj
from .christoffel import christoffel

__all__ = ["jtj", "christoffel"]
