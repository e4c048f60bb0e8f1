"""pygeo.optim.refine_latents: exact on the linear-Gaussian case, monotone, batched, and its objective, gradient and
Fisher matrix checked against torch.distributions, autograd and brute-force Jacobians for every likelihood."""
import math

import pytest
import torch
from torch import nn

from pygeo.optim import RefineResult, refine_latents
from pygeo.optim.refine import _Objective
from pygeo.metrics.pullback import PullbackMetric


def linear_case(N=6, d=3, D=8, sigma=0.7, seed=0):
    generator = torch.Generator().manual_seed(seed)
    decoder = nn.Linear(d, D).double()
    with torch.no_grad():
        decoder.weight.copy_(torch.randn(D, d, generator=generator, dtype=torch.float64))
        decoder.bias.copy_(torch.randn(D, generator=generator, dtype=torch.float64))
    x = torch.randn(N, D, generator=generator, dtype=torch.float64)
    z0 = torch.randn(N, d, generator=generator, dtype=torch.float64)
    return decoder, x, z0, sigma


@pytest.mark.parametrize("prior", ["standard", None])
def test_linear_gaussian_one_natural_step_is_exact(prior):
    decoder, x, z0, sigma = linear_case()
    W, b = decoder.weight.detach(), decoder.bias.detach()
    precision = W.T @ W / sigma ** 2 + (torch.eye(3, dtype=torch.float64) if prior else 0)
    optimum = torch.linalg.solve(precision, (W.T @ (x - b).T) / sigma ** 2).T  # closed-form MAP / least squares
    result = refine_latents(decoder, x, z0, likelihood="gaussian", sigma=sigma, steps=1, prior=prior)
    assert isinstance(result, RefineResult)
    assert result.z.shape == z0.shape and result.loss.shape == (2, 6) and result.covariance.shape == (6, 3, 3)
    torch.testing.assert_close(result.z, optimum, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(result.covariance, torch.linalg.inv(precision).expand(6, 3, 3), rtol=1e-10, atol=1e-12)
    # a second step cannot improve on the optimum
    again = refine_latents(decoder, x, z0, likelihood="gaussian", sigma=sigma, steps=3, prior=prior)
    torch.testing.assert_close(again.z, optimum, rtol=1e-10, atol=1e-10)
    assert bool((again.loss[1:] - again.loss[1]).abs().max() < 1e-9)


def smooth_decoder(d=2, D=7, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 11), nn.Softplus(), nn.Linear(11, D)).to(dtype)


class MeanStd(nn.Module):
    def __init__(self, d=2, D=7):
        super().__init__()
        torch.manual_seed(1)
        self.body = smooth_decoder(d, 2 * D, seed=1)

    def forward(self, z):
        mean, raw = self.body(z).chunk(2, dim=-1)
        return mean, nn.functional.softplus(raw) + 0.1


def reference_loss(likelihood, output, x, z, prior):
    """-log p(x | z) - log N(z; 0, I) by torch.distributions (independent of pygeo's formulas)."""
    if likelihood == "euclidean":
        nll = 0.5 * (x - output).square().sum(-1)
    elif likelihood == "gaussian" and isinstance(output, tuple):
        nll = -torch.distributions.Normal(output[0], output[1]).log_prob(x).sum(-1)
    elif likelihood == "gaussian":
        nll = -torch.distributions.Normal(output, 0.3).log_prob(x).sum(-1)
    else:
        nll = -torch.distributions.Bernoulli(logits=output, validate_args=False).log_prob(x).sum(-1)
    if prior:
        nll = nll - torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
    return nll


CASES = [("euclidean", None, False), ("gaussian", 0.3, False), ("gaussian", None, True), ("bernoulli", None, False)]


@pytest.mark.parametrize("likelihood, sigma, learned", CASES)
@pytest.mark.parametrize("prior", ["standard", None])
def test_objective_gradient_and_fisher_against_autograd(likelihood, sigma, learned, prior):
    decoder = MeanStd() if learned else smooth_decoder()
    generator = torch.Generator().manual_seed(2)
    x = torch.rand(5, 7, generator=generator, dtype=torch.float64)
    z = torch.randn(5, 2, generator=generator, dtype=torch.float64)
    metric = PullbackMetric(decoder, likelihood=likelihood, sigma=sigma)
    objective = _Objective(metric, x, prior)
    value, grad = objective.value_and_gradient(z)

    point = z.clone().requires_grad_(True)
    expected = reference_loss(likelihood, decoder(point), x, point, prior)
    (expected_grad,) = torch.autograd.grad(expected.sum(), point)
    torch.testing.assert_close(value, expected.detach(), rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)
    # the start of refine_latents reports the same objective
    torch.testing.assert_close(refine_latents(decoder, x, z, likelihood, sigma, steps=0, prior=prior).loss[0],
                               expected.detach(), rtol=1e-12, atol=1e-10)

    # Fisher of the objective by brute force: J^T F J (+ I), J from a full autograd Jacobian of the decoder output
    def rows(point):
        out = decoder(point.unsqueeze(0))
        return torch.cat([part.reshape(-1) for part in out]) if learned else out.reshape(-1)
    brute = []
    for n in range(5):
        J = torch.autograd.functional.jacobian(rows, z[n])  # [R, d]
        out = rows(z[n]).detach()
        if likelihood == "euclidean":
            weight = torch.ones_like(out)
        elif learned:
            std = out[7:]
            weight = torch.cat([std ** -2, 2 * std ** -2])  # mean part 1/std^2, log-std part 2 (chain rule to std)
        elif likelihood == "gaussian":
            weight = torch.full_like(out, sigma ** -2)
        else:
            p = torch.sigmoid(out)
            weight = p * (1 - p)
        brute.append(J.T @ (weight[:, None] * J) + (torch.eye(2, dtype=torch.float64) if prior else 0))
    torch.testing.assert_close(objective.fisher(z), torch.stack(brute), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("method", ["natural", "gradient"])
@pytest.mark.parametrize("likelihood, sigma, learned", CASES)
def test_line_search_methods_never_increase_any_point_loss(method, likelihood, sigma, learned):
    decoder = MeanStd() if learned else smooth_decoder(dtype=torch.float32)
    generator = torch.Generator().manual_seed(3)
    x = torch.rand(64, 7, generator=generator)
    z0 = 2 * torch.randn(64, 2, generator=generator)
    if learned:
        decoder = decoder.float()
    result = refine_latents(decoder, x, z0, likelihood, sigma, steps=6, method=method)
    assert bool((result.loss[1:] <= result.loss[:-1]).all())
    assert float(result.loss[-1].mean()) < float(result.loss[0].mean())  # and it does make progress
    assert bool(torch.isfinite(result.covariance).all())


def test_points_are_refined_independently_of_the_batch():
    decoder = smooth_decoder()
    generator = torch.Generator().manual_seed(4)
    x = torch.rand(6, 7, generator=generator, dtype=torch.float64)
    z0 = torch.randn(6, 2, generator=generator, dtype=torch.float64)
    for method, lr in (("natural", 1.0), ("gradient", 1.0), ("adam", 0.1)):
        together = refine_latents(decoder, x, z0, "bernoulli", steps=5, method=method, lr=lr)
        first = refine_latents(decoder, x[:2], z0[:2], "bernoulli", steps=5, method=method, lr=lr)
        rest = refine_latents(decoder, x[2:], z0[2:], "bernoulli", steps=5, method=method, lr=lr)
        torch.testing.assert_close(together.z, torch.cat([first.z, rest.z]), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(together.loss, torch.cat([first.loss, rest.loss], 1), rtol=1e-9, atol=1e-9)


def test_natural_converges_in_fewer_steps_than_gradient_and_adam():
    decoder = smooth_decoder(dtype=torch.float32)
    generator = torch.Generator().manual_seed(5)
    x = (torch.rand(32, 7, generator=generator) > 0.5).float()
    z0 = torch.randn(32, 2, generator=generator)
    best = refine_latents(decoder, x, z0, "bernoulli", steps=30).loss[-1]
    natural = refine_latents(decoder, x, z0, "bernoulli", steps=5).loss[-1]
    gradient = refine_latents(decoder, x, z0, "bernoulli", steps=5, method="gradient").loss[-1]
    adam = refine_latents(decoder, x, z0, "bernoulli", steps=5, method="adam", lr=0.1).loss[-1]
    assert float((natural - best).mean()) < 1e-3
    assert float((natural - best).mean()) < float((gradient - best).mean())
    assert float((natural - best).mean()) < float((adam - best).mean())


def test_fused_and_generic_decoders_agree():
    decoder = smooth_decoder()
    generator = torch.Generator().manual_seed(6)
    x = torch.rand(4, 7, generator=generator, dtype=torch.float64)
    z0 = torch.randn(4, 2, generator=generator, dtype=torch.float64)
    fused = refine_latents(decoder, x, z0, "bernoulli", steps=3)
    generic = refine_latents(lambda z: decoder(z), x, z0, "bernoulli", steps=3)
    torch.testing.assert_close(fused.z, generic.z, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(fused.covariance, generic.covariance, rtol=1e-9, atol=1e-9)


def test_clear_errors():
    decoder = smooth_decoder(dtype=torch.float32)
    x, z0 = torch.rand(4, 7), torch.randn(4, 2)
    with pytest.raises(ValueError, match="method"):
        refine_latents(decoder, x, z0, "bernoulli", method="newton")
    with pytest.raises(ValueError, match="lr"):
        refine_latents(decoder, x, z0, "bernoulli", lr=0.0)
    with pytest.raises(ValueError, match="steps"):
        refine_latents(decoder, x, z0, "bernoulli", steps=-1)
    with pytest.raises(ValueError, match="prior"):
        refine_latents(decoder, x, z0, "bernoulli", prior="laplace")
    with pytest.raises(ValueError, match="same number of points"):
        refine_latents(decoder, x, z0[:3], "bernoulli")
    with pytest.raises(ValueError, match=r"z0 must have shape \[N, d\]"):
        refine_latents(decoder, x, z0.unsqueeze(0), "bernoulli")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        refine_latents(decoder, x + 1, z0, "bernoulli")
    with pytest.raises(ValueError, match="x must have the decoder output's shape"):
        refine_latents(decoder, torch.rand(4, 6), z0, "bernoulli")
    with pytest.raises(ValueError, match="sigma"):
        refine_latents(decoder, x, z0, "bernoulli", sigma=1.0)
    with pytest.raises(ValueError, match="likelihood"):
        refine_latents(decoder, x, z0, "poisson")
    with pytest.raises(ValueError, match=r"\(mean, std\)"):
        refine_latents(decoder, x, z0, "gaussian")
    with pytest.raises(TypeError, match="dtype"):
        refine_latents(decoder, x.double(), z0, "bernoulli")
    with pytest.raises(ValueError, match="NaN"):
        refine_latents(decoder, x, z0 * math.nan, "bernoulli")
    with pytest.raises(TypeError, match="decoder"):
        refine_latents("decoder", x, z0, "bernoulli")
