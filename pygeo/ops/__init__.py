"""Low-level fused operations on tensors. Each is a torch.library custom op (pygeo::<name>) with a fake
implementation and an autograd formula, dispatched to a backend by pygeo._backend."""
from .jtj import jtj

__all__ = ["jtj"]
from .langevin_step import langevin_step  # noqa: E402

__all__ += ["langevin_step"]
