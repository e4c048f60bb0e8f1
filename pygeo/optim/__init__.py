"""pygeo.optim: optimisation with the Fisher geometry of a model's own likelihoods (MATH.md section 6).

refine_latents   per-point natural-gradient (Gauss-Newton) refinement of latent codes through a decoder
NaturalGradient  K-FAC natural-gradient optimiser for network weights (torch.optim pattern)
sampled_nll      the sampled-target negative log-likelihood whose gradients give NaturalGradient its true Fisher
"""
from .kfac import NaturalGradient, sampled_nll
from .refine import RefineResult, refine_latents

__all__ = ["refine_latents", "RefineResult", "NaturalGradient", "sampled_nll"]
