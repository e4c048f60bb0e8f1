import math

import pytest
import torch
from torch.distributions import MultivariateNormal

import pygeo
from pygeo.reference.langevin_step import langevin_step as langevin_step_reference

from conftest import assert_close, backend_params

BACKENDS = backend_params()


def random_inputs(B, d, drift, with_target=True, dtype=torch.float64):
    """Well-conditioned SPD metrics and matching inputs, float64 on the CPU."""
    A = torch.randn(B, d, d, dtype=dtype)
    G = A @ A.transpose(-1, -2) / d + 0.5 * torch.eye(d, dtype=dtype)
    dG = torch.randn(B, d, d, d, dtype=dtype)
    inputs = dict(z=torch.randn(B, d, dtype=dtype), G=G, grad_log_prob=torch.randn(B, d, dtype=dtype),
                  step_size=torch.rand(B, dtype=dtype) + 0.05, noise=torch.randn(B, d, dtype=dtype))
    extra = {"simplified": {}, "dG": {"dG": dG + dG.transpose(-1, -2)}, "div": {"div_Ginv": torch.randn(B, d, dtype=dtype)}}
    inputs.update(extra[drift])
    if with_target:
        inputs["target"] = torch.randn(B, d, dtype=dtype)
    return inputs


def run(inputs, backend, device, dtype):
    moved = {k: v.to(device=device, dtype=dtype) for k, v in inputs.items()}
    z, G, grad, h, noise = (moved.pop(k) for k in ("z", "G", "grad_log_prob", "step_size", "noise"))
    return pygeo.ops.langevin_step(z, G, grad, h, noise, backend=backend, **moved)


def reference(inputs):
    return langevin_step_reference(**inputs)


def compare(result, expected, dtype):
    for name in ("proposal", "mean", "half_log_det", "log_q_proposal", "log_q_target"):
        actual, wanted = getattr(result, name), getattr(expected, name)
        if wanted is None:
            assert actual is None, name
            continue
        assert actual.dtype == dtype, name
        assert_close(actual.cpu(), wanted, dtype)
    assert torch.equal(result.ok.cpu(), expected.ok)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("B,d", [(1, 1), (7, 3), (19, 3), (9, 17), (1000, 2)])
@pytest.mark.parametrize("drift", ["simplified", "dG", "div"])
def test_langevin_step_matches_float64_reference(backend_device, dtype, B, d, drift):
    backend, device = backend_device
    inputs = random_inputs(B, d, drift, with_target=(B != 1))
    expected = reference(inputs)
    result = run(inputs, backend, device, dtype)
    assert result.proposal.shape == (B, d) and result.ok.shape == (B,) and result.ok.dtype == torch.bool
    assert bool(expected.ok.all())
    if dtype == torch.float32:  # float32 inputs are a perturbation of the float64 ones: compare like for like
        expected = reference({k: v.float().double() for k, v in inputs.items()})
    compare(result, expected, dtype)


def test_reference_is_the_langevin_proposal_density():
    """mean = z + h/2 G^-1 grad + h/2 div(G^-1) with div(G^-1)_i = sum_j d_j Ginv[i, j] (by autograd), and log q is the
    normalised N(mean, h G^-1) log-density."""
    d = 3
    M = torch.randn(d, d, dtype=torch.float64)

    def metric(z):
        return torch.eye(d, dtype=z.dtype) * (1 + (z * z).sum()) + torch.outer(torch.sin(M @ z), torch.sin(M @ z))

    z = torch.randn(d, dtype=torch.float64)
    G = metric(z)
    dG = torch.autograd.functional.jacobian(metric, z).permute(2, 0, 1)  # [k, i, j]
    div = torch.autograd.functional.jacobian(lambda x: torch.linalg.inv(metric(x)), z).diagonal(dim1=1, dim2=2).sum(-1)
    grad, noise, target, h = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64), 0.3
    result = langevin_step_reference(z[None], G[None], grad[None], torch.tensor([h], dtype=torch.float64), noise[None],
                                     dG=dG[None], target=target[None])
    Ginv = torch.linalg.inv(G)
    mean = z + h / 2 * Ginv @ grad + h / 2 * div
    assert_close(result.mean[0], mean, torch.float64)
    density = MultivariateNormal(mean, covariance_matrix=h * Ginv)
    assert_close(result.log_q_target[0], density.log_prob(target), torch.float64)
    assert_close(result.log_q_proposal[0], density.log_prob(result.proposal[0]), torch.float64)
    assert_close(result.half_log_det[0], 0.5 * torch.logdet(G), torch.float64)


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_langevin_step_flags_non_spd_chains(backend_device, dtype):
    backend, device = backend_device
    inputs = random_inputs(10, 3, "dG")  # 10 chains: a block of 8 (the C++ kernel's lanes) and 2 more
    inputs["G"][1] = -torch.eye(3, dtype=torch.float64)  # negative definite: no jitter helps
    inputs["G"][3] = torch.zeros(3, 3, dtype=torch.float64)  # zero: jitter scale is zero
    G4 = torch.diag(torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64))  # singular PSD: rescued by jitter
    inputs["G"][4] = G4
    inputs["G"][9] = -torch.eye(3, dtype=torch.float64)
    result = run(inputs, backend, device, dtype)
    assert result.ok.cpu().tolist() == [True, False, True, False, True, True, True, True, True, False]
    for name in ("proposal", "mean", "half_log_det", "log_q_proposal", "log_q_target"):
        assert torch.isfinite(getattr(result, name)).all(), name
    z = inputs["z"].to(dtype)
    for b in (1, 3, 9):
        assert torch.equal(result.proposal[b].cpu(), z[b]) and torch.equal(result.mean[b].cpu(), z[b])
        assert result.half_log_det[b] == 0 and result.log_q_proposal[b] == 0 and result.log_q_target[b] == 0
    good = [0, 2, 5, 6, 7, 8]
    expected = reference({k: v[good] for k, v in inputs.items()})
    actual = run({k: v[good] for k, v in inputs.items()}, backend, device, dtype)
    for name in ("proposal", "half_log_det"):
        assert_close(getattr(result, name)[good].cpu(), getattr(expected, name), dtype)
        assert_close(getattr(actual, name).cpu(), getattr(expected, name), dtype)
    # The jitter-rescued chain is finite and 1/2 log det reflects the small jitter.
    assert result.half_log_det[4] < -3


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_langevin_step_flags_non_finite_metric(backend_device):
    backend, device = backend_device
    inputs = random_inputs(9, 3, "dG")
    inputs["G"][1, 2, 0] = float("nan")
    inputs["G"][2, 1, 1] = float("inf")
    inputs["dG"][3, 0, 1, 2] = float("inf")
    result = run(inputs, backend, device, torch.float64)
    assert result.ok.cpu().tolist() == [True, False, False, False] + [True] * 5
    for name in ("proposal", "mean", "half_log_det", "log_q_proposal", "log_q_target"):
        assert torch.isfinite(getattr(result, name)).all(), name
    assert torch.equal(result.proposal[1:4].cpu(), inputs["z"][1:4])


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_langevin_step_batch_dims_scalar_step_and_noncontiguous(backend_device):
    backend, device = backend_device
    inputs = random_inputs(6, 4, "dG")
    flat = langevin_step_reference(**{**inputs, "step_size": torch.full((6,), 0.2, dtype=torch.float64)})
    to = dict(device=device)
    G = inputs["G"].transpose(-1, -2).contiguous().transpose(-1, -2).to(**to)  # a non-contiguous (symmetric) view
    result = pygeo.ops.langevin_step(inputs["z"].reshape(2, 3, 4).to(**to), G.reshape(2, 3, 4, 4), inputs["grad_log_prob"].reshape(2, 3, 4).to(**to),
                                     0.2, inputs["noise"].reshape(2, 3, 4).to(**to), dG=inputs["dG"].reshape(2, 3, 4, 4, 4).to(**to),
                                     target=inputs["target"].reshape(2, 3, 4).to(**to), backend=backend)
    assert result.proposal.shape == (2, 3, 4) and result.log_q_target.shape == (2, 3) and result.ok.shape == (2, 3)
    assert_close(result.proposal.reshape(6, 4).cpu(), flat.proposal, torch.float64)
    assert_close(result.log_q_target.reshape(6).cpu(), flat.log_q_target, torch.float64)


def test_langevin_step_proposal_distribution():
    """Many draws of one chain's proposal have mean `mean` and covariance h G^-1."""
    d, n = 3, 20000
    inputs = random_inputs(1, d, "dG", with_target=False)
    expanded = {k: v.expand(n, *v.shape[1:]).contiguous() for k, v in inputs.items()}
    expanded["noise"] = torch.randn(n, d, dtype=torch.float64)
    result = pygeo.ops.langevin_step(expanded.pop("z"), expanded.pop("G"), expanded.pop("grad_log_prob"),
                                     expanded.pop("step_size"), expanded.pop("noise"), **expanded)
    draws = result.proposal
    covariance = inputs["step_size"][0] * torch.linalg.inv(inputs["G"][0])
    standard_error = (covariance.diagonal() / n).sqrt()
    assert ((draws.mean(0) - result.mean[0]).abs() < 4 * standard_error).all()
    torch.testing.assert_close(torch.cov(draws.T), covariance, rtol=0.05, atol=0.05 * float(covariance.abs().max()))


@pytest.mark.parametrize("backend_device", BACKENDS)
def test_langevin_step_opcheck(backend_device):
    backend, device = backend_device
    inputs = {k: v.to(device) for k, v in random_inputs(4, 3, "dG").items()}
    args = [inputs[k] for k in ("z", "G", "grad_log_prob", "step_size", "noise")]
    torch.library.opcheck(torch.ops.pygeo.langevin_step.default, (*args, inputs["dG"], None, inputs["target"], backend))
    torch.library.opcheck(torch.ops.pygeo.langevin_step.default, (*args, None, None, None, backend))


def test_langevin_step_compiles():
    inputs = random_inputs(5, 3, "dG", dtype=torch.float32)
    step = torch.compile(lambda z, G, g, h, xi, dG, t: pygeo.ops.langevin_step(z, G, g, h, xi, dG=dG, target=t).proposal,
                         fullgraph=True)
    proposal = step(*(inputs[k] for k in ("z", "G", "grad_log_prob", "step_size", "noise", "dG", "target")))
    assert_close(proposal, reference({k: v.double() for k, v in inputs.items()}).proposal, torch.float32)


def _bad(**change):
    inputs = random_inputs(4, 3, "simplified", with_target=False)
    inputs.update(change)
    args = [inputs.pop(k) for k in ("z", "G", "grad_log_prob", "step_size", "noise")]
    return lambda: pygeo.ops.langevin_step(*args, **inputs)


@pytest.mark.parametrize("bad, message", [
    (_bad(G=torch.randn(4, 3, 2, dtype=torch.float64)), "G must have shape"),
    (_bad(G=torch.eye(3, dtype=torch.float64)), "G must have shape"),
    (_bad(grad_log_prob=torch.randn(5, 3, dtype=torch.float64)), "grad_log_prob must have shape"),
    (_bad(noise=torch.randn(4, 2, dtype=torch.float64)), "noise must have shape"),
    (_bad(dG=torch.randn(4, 3, 3, dtype=torch.float64)), "dG must have"),
    (_bad(dG=torch.randn(4, 3, 3, 3, dtype=torch.float64), div_Ginv=torch.randn(4, 3, dtype=torch.float64)), "not both"),
    (_bad(step_size=0.0), "step_size must be positive"),
    (_bad(step_size=torch.tensor([0.1, -0.1, 0.1, 0.1], dtype=torch.float64)), "step_size must be positive"),
    (_bad(step_size=torch.full((3,), 0.1, dtype=torch.float64)), "step_size must be a scalar or have the batch shape"),
    (_bad(z=torch.randn(4, 3)), "same dtype"),
    (_bad(z=torch.randint(0, 3, (4, 3))), "z must be a real floating tensor"),
    (_bad(noise=torch.full((4, 3), float("nan"), dtype=torch.float64)), "noise contains NaN"),
    (_bad(z=torch.randn(4, 3, dtype=torch.float64, requires_grad=True)), "not differentiable"),
    (_bad(z=torch.randn(4, 0, dtype=torch.float64)), "non-empty last dimension"),
])
def test_langevin_step_bad_input(bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        bad()


def test_langevin_step_normalising_constant():
    """log q integrates to one: in 1-D with G = g, log q(a | z) = log N(a; mean, h / g)."""
    z, g, grad, h, xi = (torch.tensor([v], dtype=torch.float64) for v in (0.3, 2.0, -1.0, 0.5, 0.7))
    result = pygeo.ops.langevin_step(z[None], g[None, None], grad[None], h, xi[None], target=torch.tensor([[1.1]], dtype=torch.float64))
    mean = 0.3 + 0.25 * (-1.0 / 2.0)
    variance = 0.5 / 2.0
    expected = -0.5 * math.log(2 * math.pi * variance) - (1.1 - mean) ** 2 / (2 * variance)
    assert abs(float(result.log_q_target) - expected) < 1e-12


@pytest.mark.parametrize("backend_device", BACKENDS)
@pytest.mark.parametrize("B", [1, 67])  # the C++ kernel's per-chain code (B = 1) and its SIMD lanes plus a tail
def test_log_q_target_keeps_its_digits_at_a_tiny_step_far_from_the_origin(backend_device, B):
    """The MALA reverse density log q(z | z*) at a small step: the residual r = z - mean(z*) is ~ sqrt(h), while
    mean = z* + (h/2) drift is ~ |z*|. Formed as target - mean it loses up to half an ulp of |z*| to the rounding of
    mean (where the drift term (h/2) drift is about an ulp of z*), an error of about 2 |C^T r| |C| ulp(z*) / h in
    log q (~0.1 here: float32, h = 1e-8, |z*| = 100, |grad| = 1e3); formed as (target - z*) - (h/2) drift, exact
    when the two points are close, it keeps float32's precision. Issue 30's at-the-edge langevin_step finding
    (float32 at step 1e-8): the kernels were wrong, not the fuzz tolerance: two backends whose drifts differ in the
    last bit rounded mean to neighbouring floats, and target - mean magnified that to the size of r."""
    backend, device = backend_device
    generator = torch.Generator().manual_seed(3)
    d, h = 2, 1e-8
    A = torch.randn(B, d, d, generator=generator, dtype=torch.float64)
    z_star = (100 + torch.randn(B, d, generator=generator, dtype=torch.float64)).float().double()
    inputs = dict(z=z_star, G=(A @ A.mT / d + 0.5 * torch.eye(d, dtype=torch.float64)).float().double(),
                  grad_log_prob=(1e3 * torch.randn(B, d, generator=generator, dtype=torch.float64)).float().double(),
                  step_size=torch.full((B,), h, dtype=torch.float64).float().double(),
                  noise=torch.randn(B, d, generator=generator, dtype=torch.float64).float().double())
    inputs["target"] = (z_star + h**0.5 * torch.randn(B, d, generator=generator, dtype=torch.float64)).float().double()
    expected = reference(inputs)  # float64 on the float32 inputs: exact to far below float32's precision here
    result = run(inputs, backend, device, torch.float32)
    assert_close(result.log_q_target.cpu(), expected.log_q_target, torch.float32)
