"""The two metrics of a decoder returning (mean, std), form="fisher" and form="expected", and the RBF-precision
uncertainty decoder of pygeo.models (Arvanitidis, Hansen & Hauberg, ICLR 2018)."""
import math

import pytest
import torch

import pygeo
from pygeo.metrics.base import metric_and_derivative_by_autograd
from pygeo.models import RBFVariance, UncertaintyDecoder, fit_uncertainty_decoder

from conftest import assert_close

F64 = torch.float64


def mlp(d=2, hidden=7, D=5, final=None):
    layers = [torch.nn.Linear(d, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, D)]
    return torch.nn.Sequential(*layers, *([final] if final is not None else [])).to(F64)


def uncertainty_decoder(d=2, D=5, K=4, seed=0):
    """An UncertaintyDecoder with random (positive) RBF weights, its mean an MLP with a sigmoid output."""
    torch.manual_seed(seed)
    variance = RBFVariance(torch.randn(K, d, dtype=F64), torch.rand(K, dtype=F64) + 0.5, D, zeta=0.05)
    with torch.no_grad():
        variance.log_weight.copy_(torch.randn(K, D, dtype=F64))
    return UncertaintyDecoder(mlp(d, 7, D, torch.nn.Sigmoid()), variance)


def explicit(decoder, z, form):
    """G from jacfwd of the rows (mean, std) and the formulas of docs/MATH.md section 1."""
    def rows(point):
        mean, std = decoder(point.unsqueeze(0))
        return torch.cat([mean.reshape(-1), std.reshape(-1)])
    J = torch.func.vmap(torch.func.jacfwd(rows))(z)
    values = torch.func.vmap(rows)(z)
    D = values.shape[-1] // 2
    J_mean, J_std, std = J[:, :D], J[:, D:], values[:, D:]
    if form == "expected":
        return J_mean.transpose(-1, -2) @ J_mean + J_std.transpose(-1, -2) @ J_std
    J_log_std = J_std / std.unsqueeze(-1)
    return (J_mean.transpose(-1, -2) @ (std.pow(-2).unsqueeze(-1) * J_mean)
            + 2 * J_log_std.transpose(-1, -2) @ J_log_std)


class ExponentialStdDecoder(torch.nn.Module):
    """mean = A z, std_j = exp(b_j^T z + c_j): closed forms G_expected = A^T A + sum_j std_j^2 b_j b_j^T and
    G_fisher = A^T diag(1/std^2) A + 2 B^T B."""

    def __init__(self, d=3, D=4):
        super().__init__()
        generator = torch.Generator().manual_seed(1)
        self.A = torch.randn(D, d, dtype=F64, generator=generator)
        self.B = 0.5 * torch.randn(D, d, dtype=F64, generator=generator)
        self.c = 0.3 * torch.randn(D, dtype=F64, generator=generator)

    def forward(self, z):
        return z @ self.A.T, (z @ self.B.T + self.c).exp()


def test_closed_forms_of_both_forms():
    decoder = ExponentialStdDecoder()
    z = torch.randn(6, 3, dtype=F64)
    std = (z @ decoder.B.T + decoder.c).exp()  # [6, D]
    A, B = decoder.A, decoder.B
    expected_form = A.T @ A + torch.einsum("bj,ji,jk->bik", std.pow(2), B, B)
    fisher_form = torch.einsum("ji,bj,jk->bik", A, std.pow(-2), A) + 2 * B.T @ B
    assert_close(pygeo.PullbackMetric(decoder, "gaussian", form="expected").metric(z), expected_form, F64)
    assert_close(pygeo.PullbackMetric(decoder, "gaussian", form="fisher").metric(z), fisher_form, F64)
    assert_close(pygeo.PullbackMetric(decoder, "gaussian").metric(z), fisher_form, F64)  # fisher is the default


@pytest.mark.parametrize("form", ["expected", "fisher"])
@pytest.mark.parametrize("generic", [False, True])
def test_uncertainty_decoder_metric_and_derivative_against_autograd(form, generic):
    decoder = uncertainty_decoder()
    used = (lambda z: decoder(z)) if generic else decoder  # a plain function is never fused
    metric = pygeo.PullbackMetric(used, "gaussian", form=form)
    assert (metric._mean_mlp is not None) == (form == "expected" and not generic), "fused exactly where it applies"
    z = torch.randn(7, 2, dtype=F64)
    assert_close(metric.metric(z), explicit(decoder, z, form), F64)
    G, dG = metric.metric_and_derivative(z)
    G_ref, dG_ref = metric_and_derivative_by_autograd(lambda point: explicit(decoder, point, form), z)
    assert_close(G, G_ref, F64)
    assert_close(dG, dG_ref, F64)


def test_fused_expected_path_gradients_match_the_generic_path():
    decoder = uncertainty_decoder(seed=3)
    fused = pygeo.PullbackMetric(decoder, "gaussian", form="expected")
    generic = pygeo.PullbackMetric(lambda z: decoder(z), "gaussian", form="expected")
    z = torch.randn(5, 2, dtype=F64)
    value, grad = fused.log_volume_and_grad(z)
    value_ref, grad_ref = generic.log_volume_and_grad(z)
    assert_close(value, value_ref, F64)
    assert_close(grad, grad_ref, F64)
    torch.autograd.gradcheck(lambda point: fused.log_volume(point), (z.clone().requires_grad_(),))


def test_expected_form_has_flat_coordinates_and_fisher_form_has_none():
    decoder = uncertainty_decoder()
    z = torch.randn(4, 2, dtype=F64)
    metric = pygeo.PullbackMetric(decoder, "gaussian", form="expected")
    assert metric.has_flat_coordinates
    J_phi = torch.func.vmap(torch.func.jacfwd(lambda p: metric.flat_coordinates(p.unsqueeze(0))[0]))(z)
    assert_close(J_phi.transpose(-1, -2) @ J_phi, metric.metric(z), F64)
    fisher = pygeo.PullbackMetric(decoder, "gaussian", form="fisher")
    assert not fisher.has_flat_coordinates
    with pytest.raises(NotImplementedError, match="no flat coordinates"):
        fisher.flat_coordinates(z)


def test_rbf_std_jacobian_is_the_derivative_of_the_std():
    variance = uncertainty_decoder().variance
    z = torch.randn(6, 2, dtype=F64)
    std, jacobian = variance.std_and_jacobian(z)
    assert_close(std, variance(z), F64)
    assert_close(std, variance.precision(z).rsqrt(), F64)
    reference = torch.func.vmap(torch.func.jacfwd(lambda p: variance(p.unsqueeze(0))[0]))(z)
    assert_close(jacobian, reference, F64)


def test_fit_gives_small_std_at_the_data_and_zeta_floor_far_away():
    torch.manual_seed(0)
    latents = torch.cat([torch.randn(150, 2) * 0.3 + torch.tensor([-2.0, 0.0]),
                         torch.randn(150, 2) * 0.3 + torch.tensor([2.0, 0.0])]).double()
    mean = mlp(2, 8, 6)
    noise = 0.1
    with torch.no_grad():
        data = mean(latents) + noise * torch.randn(300, 6, dtype=F64)
    before = [p.detach().clone() for p in mean.parameters()]
    decoder, losses = fit_uncertainty_decoder(mean, latents, data, n_centers=8, zeta=1e-2, steps=300, progress=False)
    assert losses[-1] < losses[0]
    assert all(torch.equal(a, b) for a, b in zip(before, mean.parameters())), "the mean must stay frozen"
    with torch.no_grad():
        at_data = decoder.variance(latents).median()
        far = decoder.variance(torch.tensor([[0.0, 6.0]], dtype=F64))
        gap = decoder.variance(torch.tensor([[0.0, 0.0]], dtype=F64))
    assert 0.5 * noise < float(at_data) < 2 * noise  # the std fits the noise where there are data
    torch.testing.assert_close(far, torch.full_like(far, 1e-2 ** -0.5), rtol=1e-3, atol=0)  # zeta^-1/2 far away
    assert float(gap.min()) > 5 * noise  # large in the gap between the clusters
    # The expected metric's volume is much larger where the std rises (toward the gap) than inside a cluster.
    metric = pygeo.PullbackMetric(decoder, "gaussian", form="expected")
    with torch.no_grad():
        log_volume = metric.log_volume(torch.tensor([[-2.0, 0.0], [-1.0, 0.0]], dtype=F64))
    assert float(log_volume[1] - log_volume[0]) > math.log(10)


def test_bad_arguments():
    decoder = uncertainty_decoder()
    with pytest.raises(ValueError, match="form must be one of"):
        pygeo.PullbackMetric(decoder, "gaussian", form="blog")
    with pytest.raises(ValueError, match="form='expected' applies to likelihood='gaussian' with sigma=None"):
        pygeo.PullbackMetric(mlp(), "bernoulli", form="expected")
    with pytest.raises(ValueError, match="fixed sigma"):
        pygeo.PullbackMetric(mlp(), "gaussian", sigma=0.5, form="expected")
    with pytest.raises(ValueError, match=r"z must have shape \[\.\.\., 2\]"):
        pygeo.PullbackMetric(decoder, "gaussian", form="expected").metric(torch.randn(3, 4, dtype=F64))
    with pytest.raises(ValueError, match="bandwidths must have shape"):
        RBFVariance(torch.zeros(3, 2), torch.ones(2), 4)
    with pytest.raises(ValueError, match="zeta"):
        RBFVariance(torch.zeros(3, 2), torch.ones(3), 4, zeta=0.0)
    with pytest.raises(ValueError, match="n_centers"):
        RBFVariance.from_latents(torch.randn(5, 2), 6, 4)
    with pytest.raises(ValueError, match="one row per latent"):
        fit_uncertainty_decoder(mlp(), torch.randn(5, 2, dtype=F64), torch.randn(4, 5, dtype=F64), n_centers=2)
    with pytest.raises(TypeError, match="variance must be"):
        UncertaintyDecoder(mlp(), mlp())
