"""Posterior-collapse diagnostics and the Gaussian-ball view of a VAE's latent space (MATH.md section 6).

Every function takes the encoder's diagonal Gaussian posteriors q(z | x_n) = N(mu_n, diag exp(logvar_n)) as tensors
mu, logvar [N, d] (float32 or float64, one device) and is batched over the N data points:

- kl_per_dimension: the KL term of the ELBO split by latent unit; a collapsed unit pays (almost) nothing.
- active_units: Burda et al.'s count of units whose posterior mean varies with the data.
- mutual_information: I(x; z) under the aggregate posterior (He et al. 2019), a plug-in estimate capped by log N.
- bhattacharyya_coefficient / posterior_balls: each encoding as a ball (its posterior), how much neighbouring balls
  overlap, and how much of the prior they cover ("from points to spheres": the KL term turns codes into balls; a
  deterministic autoencoder or a VQ-VAE is the zero-radius limit).
- collapse_report: all of the above for a trained VAE, joined with the curvature of its decoder's metric at the encoder
  means and the critical curvature kappa_c = 1 / (2 sigma^2) of the claim pygeo's collapse experiment tests.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from . import _checks

_BLOCK_ELEMENTS = 1 << 22  # entries of one [chunk, N] block of the pairwise computations: memory O(chunk x N)
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def _posteriors(mu: torch.Tensor, logvar: Optional[torch.Tensor], mu_name: str = "mu",
                logvar_name: str = "logvar") -> None:
    """mu (and logvar) are finite float32/float64 tensors [N, d] with N >= 1, d >= 1, of one shape, dtype, device."""
    _checks.real_tensor(mu_name, mu)
    if mu.dim() != 2 or mu.shape[1] == 0:
        raise ValueError(f"{mu_name} must have shape [N, d] with d >= 1, got {tuple(mu.shape)}")
    if mu.shape[0] == 0:
        raise ValueError(f"{mu_name} must hold at least one posterior (N >= 1), got shape {tuple(mu.shape)}")
    if logvar is None:
        return
    _checks.real_tensor(logvar_name, logvar)
    if logvar.shape != mu.shape:
        raise ValueError(f"{logvar_name} must have the shape of {mu_name} {tuple(mu.shape)}, got {tuple(logvar.shape)}")
    _checks.same_device(**{mu_name: mu, logvar_name: logvar})
    _checks.same_dtype(**{mu_name: mu, logvar_name: logvar})


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def kl_per_dimension(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(q(z_u | x) || N(0, 1)) averaged over the data, per latent unit u: mu, logvar [N, d] -> [d] (nats).

    1/2 mean_n (mu_nu^2 + exp(logvar_nu) - logvar_nu - 1); the sum over u is the ELBO's KL term. A collapsed unit
    (posterior = prior for every x) has 0.
    """
    _posteriors(mu, logvar)
    return 0.5 * (mu.square() + logvar.exp() - logvar - 1.0).mean(0)


def active_units(mu: torch.Tensor, threshold: float = 0.01) -> Tuple[int, torch.Tensor]:
    """(count, activity [d]) for posterior means mu [N, d], N >= 2.

    activity_u = Var_x(E_q[z_u | x]), the unbiased (N - 1) variance of the posterior means over the data; a unit is
    active when activity_u >= threshold (Burda et al. 2016, threshold 0.01 as in the lagging-inference-networks code).
    """
    _posteriors(mu, None)
    if mu.shape[0] < 2:
        raise ValueError(f"mu must hold at least two posteriors to measure their spread, got shape {tuple(mu.shape)}")
    threshold = _checks.number("threshold", threshold)
    if not (threshold >= 0 and math.isfinite(threshold)):
        raise ValueError(f"threshold must be a finite number >= 0, got {threshold!r}")
    activity = mu.var(0, correction=1)
    return int((activity >= threshold).sum()), activity


def _chunk_rows(n_columns: int) -> int:
    """Rows per [chunk, n_columns] block: at most _BLOCK_ELEMENTS entries (32 MiB in float64)."""
    return max(1, _BLOCK_ELEMENTS // max(n_columns, 1))


def _log_densities(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z_i; mu_j, diag exp(logvar_j)) [M, N] for z [M, d] and posteriors [N, d], as matrix products of the
    expanded square (memory O(M N), not O(M N d)). Callers pass float64: the expansion cancels when variances are tiny
    against the means."""
    precision = (-logvar).exp()  # [N, d]
    quadratic = (z.square() @ precision.T - 2.0 * z @ (mu * precision).T
                 + (mu.square() * precision).sum(-1))  # sum_k (z_ik - mu_jk)^2 / var_jk
    normaliser = logvar.sum(-1) + mu.shape[1] * math.log(2 * math.pi)  # [N]
    return -0.5 * (quadratic.clamp_min(0.0) + normaliser)


def mutual_information(mu: torch.Tensor, logvar: torch.Tensor, n_samples: int = 1, seed: int = 0) -> float:
    """I(x; z) = E_x E_q(z|x)[log q(z | x) - log q(z)] (nats) for the posteriors mu, logvar [N, d], with the aggregate
    posterior q(z) = 1/N sum_j q(z | x_j) the mixture of the N given posteriors (He et al. 2019).

    Monte Carlo over n_samples draws z ~ q(z | x_i) per point (a fixed seed: the caller's random state is untouched),
    in chunks of points (memory O(chunk x N)). Both log-densities are evaluated at the same draw, so each term
    log q(z | x_i) - log q(z) is at most log N (q(z) >= q(z | x_i) / N): the estimate is capped by log N by
    construction, is exactly 0 when all posteriors are identical, and tends to log N for well-separated ones. It is a
    biased (plug-in) estimate: the aggregate posterior is the mixture of these N posteriors, the draw's own included,
    so it underestimates I(x; z) of the population when log N is small against it; compare values at equal N.
    """
    _posteriors(mu, logvar)
    _positive_int("n_samples", n_samples)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    generator = torch.Generator(device=mu.device).manual_seed(seed)
    N, d = mu.shape
    mu64, logvar64 = mu.double(), logvar.double()
    std = (0.5 * logvar64).exp()
    chunk = _chunk_rows(N)
    total = torch.zeros((), dtype=torch.float64, device=mu.device)
    for _ in range(n_samples):
        for start in range(0, N, chunk):
            rows = slice(start, min(start + chunk, N))
            noise = torch.randn(mu[rows].shape, generator=generator, dtype=mu.dtype, device=mu.device).double()
            z = mu64[rows] + std[rows] * noise
            log_q_all = _log_densities(z, mu64, logvar64)  # [chunk, N]
            # log q(z_i | x_i) exactly (no cancellation), put in place of column start + i of row i, so that the
            # logsumexp below includes it and each term stays <= log N
            own = -0.5 * (noise.square().sum(-1) + logvar64[rows].sum(-1) + d * math.log(2 * math.pi))
            log_q_all.diagonal(offset=start).copy_(own)
            log_aggregate = torch.logsumexp(log_q_all, dim=1) - math.log(N)
            total += (own - log_aggregate).sum()
    return float(total) / (N * n_samples)


def bhattacharyya_coefficient(mu_a: torch.Tensor, logvar_a: torch.Tensor, mu_b: torch.Tensor,
                              logvar_b: torch.Tensor) -> torch.Tensor:
    """Overlap BC = integral sqrt(p_a p_b) of diagonal Gaussians N(mu_a, exp(logvar_a)), N(mu_b, exp(logvar_b)):
    tensors [..., d] (broadcast together) -> [...] in (0, 1]; 1 for identical balls, -> 0 as they move apart.

    Closed form: BC = exp(-D_B), D_B = 1/8 sum_u (mu_a - mu_b)^2 / v_u + 1/2 sum_u log(v_u / sqrt(va_u vb_u)),
    v = (va + vb) / 2 (in log space, so that tiny or huge variances do not overflow).
    """
    names = ("mu_a", "logvar_a", "mu_b", "logvar_b")
    tensors = (mu_a, logvar_a, mu_b, logvar_b)
    for name, value in zip(names, tensors):
        _checks.real_tensor(name, value, min_dim=1)
    _checks.same_device(**dict(zip(names, tensors)))
    _checks.same_dtype(**dict(zip(names, tensors)))
    if mu_a.shape != logvar_a.shape or mu_b.shape != logvar_b.shape:
        raise ValueError(f"each mean needs a log-variance of its shape, got mu_a {tuple(mu_a.shape)}, logvar_a "
                         f"{tuple(logvar_a.shape)}, mu_b {tuple(mu_b.shape)}, logvar_b {tuple(logvar_b.shape)}")
    if mu_a.shape[-1] != mu_b.shape[-1]:
        raise ValueError(f"mu_a and mu_b must have the same last dimension d, got {tuple(mu_a.shape)} and "
                         f"{tuple(mu_b.shape)}")
    try:
        torch.broadcast_shapes(mu_a.shape, mu_b.shape)
    except RuntimeError as error:
        raise ValueError(f"the a and b posteriors must broadcast together, got {tuple(mu_a.shape)} and "
                         f"{tuple(mu_b.shape)}") from error
    return _bhattacharyya(mu_a, logvar_a, mu_b, logvar_b)


def _bhattacharyya(mu_a, logvar_a, mu_b, logvar_b) -> torch.Tensor:
    log_mean_variance = torch.logaddexp(logvar_a, logvar_b) - math.log(2.0)
    distance = (0.125 * (mu_a - mu_b).square() * (-log_mean_variance).exp()
                + 0.5 * (log_mean_variance - 0.5 * (logvar_a + logvar_b)))
    return (-distance.sum(-1)).exp()


@dataclass
class PosteriorBalls:
    """The posteriors seen as balls (see posterior_balls).

    radius: [N], the geometric-mean standard deviation exp(mean_u logvar_u / 2) of each posterior.
    overlap: [N], mean Bhattacharyya coefficient with the k nearest other balls (by distance between means).
    neighbours: [N, k] int64, the indices of those balls, nearest first.
    prior_coverage: the share of prior draws N(0, I) within Mahalanobis distance `coverage_radius` of at least one ball.
    covered: [n_prior] bool, which of the prior draws `prior_draws` [n_prior, d] were covered.
    coverage_radius: the Mahalanobis radius used (2 standard deviations).
    """

    radius: torch.Tensor
    overlap: torch.Tensor
    neighbours: torch.Tensor
    prior_coverage: float
    covered: torch.Tensor
    prior_draws: torch.Tensor
    coverage_radius: float


def posterior_balls(mu: torch.Tensor, logvar: torch.Tensor, k: int = 5, n_prior: int = 2000, seed: int = 0,
                    coverage_radius: float = 2.0) -> PosteriorBalls:
    """Each posterior N(mu_n, diag exp(logvar_n)) (mu, logvar [N, d], N >= 2) as a ball: radius, overlap with its k
    nearest neighbours, and how much of the prior N(0, I) the balls cover.

    Overlap: the Bhattacharyya coefficient (1 = identical, 0 = disjoint) with each of the k balls whose means are
    nearest (Euclidean), averaged. Prior coverage: n_prior draws from N(0, I) (fixed seed; the caller's random state is
    untouched); a draw is covered when its Mahalanobis distance sqrt(sum_u (z_u - mu_nu)^2 / var_nu) to some ball n
    is at most coverage_radius. A prior region no ball covers decodes to something the data never produced (the
    "holes" of the latent space); in high d, where a Gaussian's mass lies near radius sqrt(d), fixed-radius coverage
    shrinks, so compare it at equal d. Pairwise work in chunks: memory O(chunk x N).
    """
    _posteriors(mu, logvar)
    N = mu.shape[0]
    if N < 2:
        raise ValueError(f"mu must hold at least two posteriors to find neighbours, got shape {tuple(mu.shape)}")
    _positive_int("k", k)
    if k > N - 1:
        raise ValueError(f"k must be at most N - 1 = {N - 1} (the other balls), got {k}")
    _positive_int("n_prior", n_prior)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    coverage_radius = _checks.number("coverage_radius", coverage_radius)
    if not (coverage_radius > 0 and math.isfinite(coverage_radius)):
        raise ValueError(f"coverage_radius must be a positive finite number, got {coverage_radius!r}")

    radius = (0.5 * logvar.mean(-1)).exp()
    chunk = _chunk_rows(N)
    neighbours = torch.empty(N, k, dtype=torch.long, device=mu.device)
    for start in range(0, N, chunk):
        stop = min(start + chunk, N)
        distances = torch.cdist(mu[start:stop].double(), mu.double())  # [chunk, N]
        own = torch.arange(stop - start, device=mu.device)
        distances[own, own + start] = math.inf  # a ball is not its own neighbour
        neighbours[start:stop] = distances.topk(k, dim=1, largest=False).indices
    overlap = _bhattacharyya(mu.unsqueeze(1), logvar.unsqueeze(1), mu[neighbours], logvar[neighbours]).mean(1)

    generator = torch.Generator(device=mu.device).manual_seed(seed)
    draws = torch.randn(n_prior, mu.shape[1], generator=generator, dtype=mu.dtype, device=mu.device)
    mu64, precision = mu.double(), (-logvar.double()).exp()
    covered = torch.empty(n_prior, dtype=torch.bool, device=mu.device)
    for start in range(0, n_prior, chunk):
        z = draws[start:start + chunk].double()
        squared = z.square() @ precision.T - 2.0 * z @ (mu64 * precision).T + (mu64.square() * precision).sum(-1)
        covered[start:start + chunk] = squared.min(1).values <= coverage_radius ** 2
    return PosteriorBalls(radius=radius, overlap=overlap, neighbours=neighbours,
                          prior_coverage=float(covered.double().mean()), covered=covered, prior_draws=draws,
                          coverage_radius=coverage_radius)


@dataclass
class CollapseReport:
    """Collapse measures of a trained VAE on a set of images, joined with its curvature (see collapse_report).

    kl_per_dimension: [d] nats; active_units: count; activity: [d] variance of the posterior means;
    active: [d] bool (activity >= threshold); mutual_information: nats (capped by log N); log_n: log N.
    balls: PosteriorBalls of the posteriors.
    curvature_points: [P, d] the encoder means where the curvature was measured.
    planes: [n_planes, 2] int64, the coordinate planes (i, j), i < j.
    sectional: [P, n_planes], the sectional curvature of each coordinate plane at each point (NaN where the metric is
        degenerate in that plane).
    scalar: [P], the scalar curvature (in 2-D, twice the Gaussian curvature).
    sectional_quantiles: {"all" | "active" | "collapsed": {q: value}} over points and planes: every plane, the planes
        of two active units, the planes with at least one collapsed unit (NaN when there is no such plane).
    kappa_c: 1 / (2 sigma^2) for a Gaussian likelihood of fixed sigma, else None.
    share_above_kappa_c: {"all" | "active" | "collapsed": share of (point, plane) values above kappa_c} (None without
        kappa_c).
    """

    kl_per_dimension: torch.Tensor
    active_units: int
    activity: torch.Tensor
    active: torch.Tensor
    mutual_information: float
    log_n: float
    balls: PosteriorBalls
    curvature_points: torch.Tensor
    planes: torch.Tensor
    sectional: torch.Tensor
    scalar: torch.Tensor
    sectional_quantiles: Dict[str, Dict[float, float]]
    kappa_c: Optional[float]
    share_above_kappa_c: Optional[Dict[str, float]]


def coordinate_plane_curvatures(metric, z: torch.Tensor, **curvature_options) -> Tuple[torch.Tensor, torch.Tensor,
                                                                                            torch.Tensor]:
    """(planes [n_planes, 2], sectional [B, n_planes], scalar [B]) at z [B, d], d >= 2: the sectional curvature
    K(e_i, e_j) = R(e_i, e_j, e_i, e_j) / (G_ii G_jj - G_ij^2) of every coordinate plane i < j, from one call of
    pygeo.curvature (the same formula as pygeo.sectional_curvature, without recomputing R per plane). A plane whose
    metric area is not positive (a degenerate direction) gives NaN."""
    from .geometry import curvature

    _checks.real_tensor("z", z, min_dim=2)
    if z.dim() != 2 or z.shape[1] < 2:
        raise ValueError(f"z must have shape [B, d] with d >= 2 (curvature needs a plane), got {tuple(z.shape)}")
    result = curvature(metric, z, **curvature_options)
    planes = torch.triu_indices(z.shape[1], z.shape[1], offset=1, device=z.device).T  # [n_planes, 2]
    i, j = planes[:, 0], planes[:, 1]
    lowered = result.riemann_lowered
    numerator = lowered[:, i, j, i, j]
    G = result.metric
    area = G[:, i, i] * G[:, j, j] - G[:, i, j].square()
    degenerate = area <= 1e3 * torch.finfo(area.dtype).eps * G[:, i, i] * G[:, j, j]
    sectional = torch.where(degenerate, torch.full_like(numerator, math.nan), numerator / area)
    return planes, sectional, result.scalar


def _quantiles(values: torch.Tensor) -> Dict[float, float]:
    values = values[~values.isnan()].double()
    if values.numel() == 0:
        return {q: math.nan for q in QUANTILES}
    found = torch.quantile(values, torch.tensor(QUANTILES, dtype=torch.float64, device=values.device))
    return {q: float(v) for q, v in zip(QUANTILES, found)}


def collapse_report(vae, images: torch.Tensor, metric=None, *, threshold: float = 0.01, k: int = 5,
                    n_curvature_points: int = 128, mi_samples: int = 1, n_prior: int = 2000,
                    seed: int = 0) -> CollapseReport:
    """Collapse diagnostics of a trained VAE on images [N, D] (N >= 2), joined with curvature at the encoder means.

    vae: a pygeo.models.VAE or LinearVAE (anything with encode(x) -> (mu, logvar), latent_dim, likelihood, sigma and
        pullback_metric()). metric: the latent metric whose curvature is measured (default: the decoder's Fisher
        metric vae.pullback_metric(), evaluated on a float64 copy of the model, as pygeo.curvature recommends; a
        metric you pass is used as given, at points of the dtype of the posterior means).
    Curvature (skipped with n_curvature_points=0): at n_curvature_points encoder means spread evenly over the images
    (all of them if fewer), the sectional curvature of every coordinate plane (in 2-D the single plane, whose K is
    half the scalar curvature) via pygeo.curvature; summarised by quantiles over the planes of active units, of
    collapsed units, and all. A unit the decoder ignores entirely makes the metric singular there: the curvature then
    fails with the error of pygeo.curvature (pass a metric restricted to the active units).
    kappa_c = 1 / (2 sigma^2) where the likelihood has a sigma (the critical curvature of the claim "collapse happens
    exactly when the sectional curvature exceeds kappa_c").
    """
    for attribute in ("encode", "latent_dim", "likelihood", "pullback_metric"):
        if not hasattr(vae, attribute):
            raise TypeError(f"vae must be a pygeo.models.VAE or LinearVAE (it has no {attribute!r}), "
                            f"got {type(vae).__name__}")
    _checks.real_tensor("images", images, min_dim=2)
    if images.shape[0] < 2:
        raise ValueError(f"images must hold at least two images, got shape {tuple(images.shape)}")
    if isinstance(n_curvature_points, bool) or not isinstance(n_curvature_points, int) or n_curvature_points < 0:
        raise ValueError(f"n_curvature_points must be an int >= 0 (0 skips the curvature), got {n_curvature_points!r}")
    mu, logvar = vae.encode(images)
    kl = kl_per_dimension(mu, logvar)
    count, activity = active_units(mu, threshold)
    active = activity >= threshold
    information = mutual_information(mu, logvar, n_samples=mi_samples, seed=seed)
    balls = posterior_balls(mu, logvar, k=min(k, mu.shape[0] - 1), n_prior=n_prior, seed=seed)

    spread = torch.linspace(0, mu.shape[0] - 1, min(n_curvature_points, mu.shape[0])).round().long().unique()
    # (n_curvature_points = 0: no points, empty curvature tensors, NaN quantiles)
    points = mu[spread.to(mu.device)]
    if metric is None:
        metric = copy.deepcopy(vae).double().pullback_metric()
        at = points.double()
    else:
        at = points
    d = mu.shape[1]
    if d >= 2 and len(at):
        planes, sectional, scalar = coordinate_plane_curvatures(metric, at)
        sectional, scalar = sectional.detach(), scalar.detach()
    else:  # no points asked for, or a curve (no intrinsic curvature)
        planes = torch.zeros(0, 2, dtype=torch.long, device=mu.device)
        sectional = at.new_zeros(len(at), 0)
        scalar = at.new_zeros(len(at))
    plane_active = active[planes[:, 0]] & active[planes[:, 1]] if len(planes) else torch.zeros(0, dtype=torch.bool)
    plane_active = plane_active.to(sectional.device)
    groups = {"all": sectional, "active": sectional[:, plane_active], "collapsed": sectional[:, ~plane_active]}
    sigma = getattr(vae, "sigma", None)
    kappa_c = None if sigma is None else 1.0 / (2.0 * float(sigma) ** 2)
    share = None
    if kappa_c is not None:
        share = {}
        for name, values in groups.items():
            values = values[~values.isnan()]
            share[name] = float((values > kappa_c).double().mean()) if values.numel() else math.nan
    return CollapseReport(kl_per_dimension=kl, active_units=count, activity=activity, active=active,
                          mutual_information=information, log_n=math.log(mu.shape[0]), balls=balls,
                          curvature_points=points, planes=planes, sectional=sectional, scalar=scalar,
                          sectional_quantiles={name: _quantiles(values) for name, values in groups.items()},
                          kappa_c=kappa_c, share_above_kappa_c=share)


__all__: List[str] = ["kl_per_dimension", "active_units", "mutual_information", "bhattacharyya_coefficient",
                      "posterior_balls", "PosteriorBalls", "collapse_report", "CollapseReport",
                      "coordinate_plane_curvatures", "QUANTILES"]
