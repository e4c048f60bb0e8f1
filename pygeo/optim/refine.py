"""refine_latents: per-point MAP refinement of latent codes with the decoder's Fisher metric (MATH.md sections 1, 6).

For each data point x_n the objective is

    L_n(z) = -log p(x_n | z) - log N(z; 0, I)          (the prior term dropped with prior=None)

with p(x | z) the decoder's output distribution (PullbackMetric's likelihoods). Its Gauss-Newton / Fisher matrix is
G(z) + I with G = J^T F J the pullback metric, so the natural step

    z <- z - t (G(z) + I)^-1 grad L_n(z)

is the Gauss-Newton step of the objective: for a linear decoder with a gaussian likelihood L_n is quadratic with
Hessian exactly G + I, and one step with t = 1 lands on the optimum. G comes from pygeo.PullbackMetric (the fused
kernel for nn.Sequential MLP decoders), the solve from one batched Cholesky factorisation.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Union

import torch
from tqdm.auto import tqdm

from .. import _checks, _linalg
from ..metrics.pullback import PullbackMetric

METHODS = ("natural", "gradient", "adam")
PRIORS = ("standard", None)

# Armijo's sufficient-decrease constant: a trial step is accepted only where it lowers the point's loss by at least
# this fraction of the first-order prediction (so a rounding-level "decrease" never counts as progress).
_ARMIJO = 1e-4


class RefineResult(NamedTuple):
    """What refine_latents returns.

    z: [N, d] the refined latents.
    loss: [steps + 1, N] the per-point objective at the start and after each step (never increasing for "natural" and
        "gradient"; Adam has no line search and may go up).
    covariance: [N, d, d] the Laplace (Gauss-Newton) posterior covariance (G(z) + I)^-1 at the result, G(z)^-1 with
        prior=None.
    """

    z: torch.Tensor
    loss: torch.Tensor
    covariance: torch.Tensor


def refine_latents(decoder: Callable[[torch.Tensor], object], x: torch.Tensor, z0: torch.Tensor,
                   likelihood: str = "gaussian", sigma: Optional[Union[float, torch.Tensor]] = None, steps: int = 10,
                   method: str = "natural", lr: float = 1.0, prior: Optional[str] = "standard",
                   max_backtracks: int = 30, eps: float = 1e-6, backend: str = "auto",
                   progress: bool = False) -> RefineResult:
    """Refine latent codes z0 [N, d] of data x [N, ...] by minimising each point's negative log posterior.

    Args:
        decoder: nn.Module or callable z [N, d] -> output [N, ...] (PullbackMetric's contract: logits for
            "bernoulli", the mean for "euclidean" and the fixed-sigma "gaussian", a pair (mean, std) for "gaussian"
            with sigma=None). Its parameters are not changed.
        x: [N, ...] the data; its trailing shape is the decoder output's (Bernoulli targets in [0, 1]).
        z0: [N, d] the starting latents (e.g. encoder means).
        likelihood: "euclidean" (-log p = |x - f|^2 / 2, i.e. unit variance without the constant), "gaussian" (with
            sigma: the fixed standard deviation; sigma=None: the decoder returns (mean, std)) or "bernoulli".
        sigma: the gaussian's fixed standard deviation (float or tensor of D elements), only with "gaussian".
        steps: the number of steps (0 returns z0, its loss and covariance).
        method: "natural" (Fisher / Gauss-Newton step, backtracking from t = lr each step), "gradient" (steepest
            descent with the same backtracking, starting each step from twice the point's last accepted step size,
            lr at first) or "adam" (torch.optim.Adam with learning rate lr on every point at once, no line search).
        lr: the initial step size (natural, gradient) or Adam's learning rate.
        prior: "standard" for N(0, I) (the step's matrix is G + I) or None (maximum likelihood, matrix G, which must
            then be positive definite: d at most the decoder's output rank).
        max_backtracks: halvings of a point's step before it is declared converged (its z then stays where it is).
        eps: the Bernoulli probability clamp of the metric (PullbackMetric's eps).
        backend: the metric kernels' backend ("auto", "torch", "cpp", "cuda", "triton").
        progress: show a tqdm bar over the steps.

    Every point has its own line search (Armijo backtracking): a trial step that does not lower that point's loss
    is halved, and a point whose step cannot be accepted keeps its latent, so "natural" and "gradient" never increase
    any point's loss. Ctrl-C stops early with the steps done so far (the loss rows of the steps not run repeat the
    last values).
    """
    _check_arguments(decoder, x, z0, steps, method, lr, prior, max_backtracks)
    if likelihood not in ("euclidean", "gaussian", "bernoulli"):  # PullbackMetric knows more than this objective
        raise ValueError(f"refine_latents: likelihood must be 'euclidean', 'gaussian' or 'bernoulli', got {likelihood!r}")
    metric = PullbackMetric(decoder, likelihood=likelihood, sigma=sigma, eps=eps, backend=backend)
    if likelihood == "bernoulli" and x.numel() and (x.min() < 0 or x.max() > 1):
        raise ValueError(f"x must hold Bernoulli targets in [0, 1] (likelihood='bernoulli'), got values in "
                         f"[{float(x.min())}, {float(x.max())}]")
    objective = _Objective(metric, x, prior)
    z = z0.detach().clone()
    losses = torch.empty(steps + 1, z.shape[0], dtype=z.dtype, device=z.device)
    with torch.no_grad():
        losses[0] = objective.value(z)
    bar = tqdm(range(steps), desc=f"refining latents ({method})", unit="step", disable=not progress)
    done = 0
    try:
        if method == "adam":
            z = _run_adam(objective, z, losses, lr, bar)
        else:
            z = _run_line_search(objective, z, losses, method, lr, max_backtracks, bar)
        done = steps
    except _Interrupted as interrupted:
        z, done = interrupted.z, interrupted.done
        tqdm.write(f"refine_latents interrupted after {done} of {steps} steps; returning the latents so far")
    finally:
        bar.close()
    losses[done + 1:] = losses[done]
    with torch.no_grad():
        covariance = torch.cholesky_inverse(_linalg.cholesky(objective.fisher(z), "G(z) + I (the Fisher of the "
                                                                                  "objective) at the refined z"))
    return RefineResult(z=z, loss=losses, covariance=covariance)


class _Interrupted(Exception):
    def __init__(self, z: torch.Tensor, done: int):
        super().__init__()
        self.z, self.done = z, done


class _Objective:
    """The per-point objective of refine_latents, its gradient and its Fisher (Gauss-Newton) matrix."""

    def __init__(self, metric: PullbackMetric, x: torch.Tensor, prior: Optional[str]):
        self.metric = metric
        self.rows = x.reshape(x.shape[0], -1)  # [N, D]
        self.prior = prior

    def value(self, z: torch.Tensor, index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """L_n(z_n) [M] for z [M, d], the data rows self.rows[index] (all rows when index is None)."""
        rows = self.rows if index is None else self.rows[index]
        loss = negative_log_likelihood(self.metric, self.metric.decoder(z), rows)
        if self.prior == "standard":
            loss = loss + 0.5 * z.square().sum(-1) + 0.5 * z.shape[-1] * math.log(2 * math.pi)
        return loss

    def value_and_gradient(self, z: torch.Tensor, index: Optional[torch.Tensor] = None):
        """(L_n [M], grad L_n [M, d]), detached; one backward for the batch (the points are independent)."""
        with torch.enable_grad():
            point = z.detach().requires_grad_(True)
            loss = self.value(point, index)
            (grad,) = torch.autograd.grad(loss.sum(), point)
        return loss.detach(), grad

    def fisher(self, z: torch.Tensor) -> torch.Tensor:
        """G(z) (+ I with the standard prior) [M, d, d], detached."""
        with torch.no_grad():
            G = self.metric.metric(z)
        if self.prior == "standard":
            G = G + torch.eye(z.shape[-1], dtype=G.dtype, device=G.device)
        return G


def negative_log_likelihood(metric: PullbackMetric, output, rows: torch.Tensor) -> torch.Tensor:
    """-log p(x | decoder output) [N] of the metric's likelihood, for data rows [N, D] (constants included, except
    for "euclidean", which is |x - f|^2 / 2)."""
    if metric.learned_std:
        if not (isinstance(output, (tuple, list)) and len(output) == 2):
            raise ValueError("likelihood='gaussian' with sigma=None needs a decoder returning (mean, std); pass sigma "
                             "for a decoder that returns only the mean")
        mean, std = (part.reshape(part.shape[0], -1) for part in output)
        _check_output_rows(mean, rows)
        return (0.5 * ((rows - mean) / std).square() + std.log()).sum(-1) + 0.5 * rows.shape[-1] * math.log(2 * math.pi)
    if not isinstance(output, torch.Tensor):
        raise ValueError(f"the decoder must return a tensor for likelihood={metric.likelihood!r}, got "
                         f"{type(output).__name__}")
    output = output.reshape(output.shape[0], -1)
    _check_output_rows(output, rows)
    if metric.likelihood == "euclidean":
        return 0.5 * (rows - output).square().sum(-1)
    if metric.likelihood == "bernoulli":
        return torch.nn.functional.binary_cross_entropy_with_logits(output, rows, reduction="none").sum(-1)
    sigma = metric._sigma_for(output, output.shape[-1])
    return ((0.5 * ((rows - output) / sigma).square() + sigma.log()).sum(-1)
            + 0.5 * rows.shape[-1] * math.log(2 * math.pi))


def _check_output_rows(output: torch.Tensor, rows: torch.Tensor) -> None:
    if output.shape != rows.shape:
        raise ValueError(f"the decoder output flattens to {tuple(output.shape)} but x to {tuple(rows.shape)}: x must "
                         f"have the decoder output's shape [N, ...]")


def _run_line_search(objective: _Objective, z: torch.Tensor, losses: torch.Tensor, method: str, lr: float,
                     max_backtracks: int, bar) -> torch.Tensor:
    """Natural or gradient steps with a per-point Armijo backtracking line search; fills losses[1:]."""
    N = z.shape[0]
    step_size = torch.full((N,), float(lr), dtype=z.dtype, device=z.device)
    active = torch.ones(N, dtype=torch.bool, device=z.device)  # points that have not yet stalled
    loss = losses[0].clone()
    for step in bar:
        try:
            index = active.nonzero().squeeze(-1)
            if index.numel():
                point = z[index]
                value, grad = objective.value_and_gradient(point, index)
                if method == "natural":
                    factor = _linalg.cholesky(objective.fisher(point), "G(z) + I (the Fisher of the objective)")
                    direction = torch.cholesky_solve(grad.unsqueeze(-1), factor).squeeze(-1)
                    trial = torch.full_like(value, float(lr))
                else:
                    direction = grad
                    trial = 2 * step_size[index]
                # Compared with the recorded loss, not `value`: re-evaluating a point in a batch of another size can
                # change its loss by rounding, and the recorded sequence must never go up.
                moved, new_loss, accepted_size, accepted = _backtrack(objective, point, loss[index], grad, direction,
                                                                      trial, index, max_backtracks)
                z[index] = moved
                loss[index] = new_loss
                step_size[index] = torch.where(accepted, accepted_size, step_size[index])
                active[index[~accepted]] = False  # no acceptable step left along a descent direction: converged
            losses[step + 1] = loss
            bar.set_postfix(loss=f"{float(loss.mean()):.4g}", moving=int(active.sum()))
        except KeyboardInterrupt:
            raise _Interrupted(z, step) from None
    return z


def _backtrack(objective: _Objective, z: torch.Tensor, loss: torch.Tensor, grad: torch.Tensor,
               direction: torch.Tensor, trial: torch.Tensor, index: torch.Tensor, max_backtracks: int):
    """Per-point Armijo backtracking along z - t direction: (new z [M, d], new loss [M], accepted t [M],
    accepted [M] bool). Points whose first-order decrease slope is not positive, or whose every trial fails, stay."""
    slope = (grad * direction).sum(-1)  # the predicted decrease per unit step, > 0 for a descent direction
    searching = torch.isfinite(slope) & (slope > 0)
    # A predicted decrease below the rounding of the loss cannot be told from noise: such a point has converged (this
    # also ends the halvings of a converged point after a few tries instead of max_backtracks).
    resolution = 8 * torch.finfo(loss.dtype).eps * (loss.abs() + 1)
    new_z, new_loss = z.clone(), loss.clone()
    accepted = torch.zeros_like(searching)
    t = trial.clone()
    with torch.no_grad():
        for _ in range(max_backtracks + 1):
            searching &= t * slope > resolution
            rows = searching.nonzero().squeeze(-1)
            if rows.numel() == 0:
                break
            candidate = z[rows] - t[rows, None] * direction[rows]
            candidate_loss = objective.value(candidate, index[rows])
            good = candidate_loss <= loss[rows] - _ARMIJO * t[rows] * slope[rows]  # NaN compares False: rejected
            chosen = rows[good]
            new_z[chosen], new_loss[chosen] = candidate[good], candidate_loss[good]
            accepted[chosen] = True
            searching[chosen] = False
            t[rows[~good]] *= 0.5
    return new_z, new_loss, t, accepted


def _run_adam(objective: _Objective, z: torch.Tensor, losses: torch.Tensor, lr: float, bar) -> torch.Tensor:
    """torch.optim.Adam on the sum of the per-point objectives (Adam is elementwise, so the points stay independent);
    fills losses[1:] with the loss after each step."""
    point = z.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([point], lr=lr)
    for step in bar:
        try:
            with torch.enable_grad():
                # autograd.grad, not backward(): the decoder's parameters must not collect gradients
                (point.grad,) = torch.autograd.grad(objective.value(point).sum(), point)
            optimizer.step()
            with torch.no_grad():
                losses[step + 1] = objective.value(point)
            bar.set_postfix(loss=f"{float(losses[step + 1].mean()):.4g}")
        except KeyboardInterrupt:
            raise _Interrupted(point.detach().clone(), step) from None
    return point.detach()


def _check_arguments(decoder, x, z0, steps, method, lr, prior, max_backtracks) -> None:
    if not callable(decoder):
        raise TypeError(f"decoder must be an nn.Module or a callable z -> output, got {type(decoder).__name__}")
    _checks.real_tensor("x", x, min_dim=1)
    _checks.real_tensor("z0", z0, min_dim=2)
    if z0.dim() != 2 or z0.shape[-1] == 0:
        raise ValueError(f"z0 must have shape [N, d] with d >= 1, got {tuple(z0.shape)}")
    if x.shape[0] != z0.shape[0]:
        raise ValueError(f"x and z0 must hold the same number of points N, got x {tuple(x.shape)} and z0 "
                         f"{tuple(z0.shape)}")
    _checks.same_device(x=x, z0=z0)
    _checks.same_dtype(x=x, z0=z0)
    for name, value, low in (("steps", steps, 0), ("max_backtracks", max_backtracks, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    lr = _checks.number("lr", lr)
    if not 0 < lr < math.inf:
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    if prior not in PRIORS:
        raise ValueError(f"prior must be 'standard' (N(0, I)) or None, got {prior!r}")
