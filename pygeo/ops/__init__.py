"""Low-level fused operations on tensors. Each is a torch.library custom op (pygeo::<name>) with a fake
implementation and an autograd formula, dispatched to a backend by pygeo._backend."""
from .christoffel import christoffel
from .jtj import jtj
from .langevin_step import langevin_step
from .latent_metric import latent_metric
from .lse_kahler_metric import lse_kahler_metric
from .mlp_metric import mlp_ensemble_metric, mlp_metric

__all__ = ["jtj", "mlp_metric", "mlp_ensemble_metric", "christoffel", "latent_metric", "langevin_step", "lse_kahler_metric"]
