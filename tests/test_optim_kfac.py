"""pygeo.optim.NaturalGradient (K-FAC): Kronecker factors against their definitions and against a brute-force Fisher
where K-FAC is exact, the step formula, the VAE training path, determinism, state_dict, fallbacks and errors."""
import copy
import functools

import pytest
import torch
from torch import nn

from pygeo.data import load_digits
from pygeo.models import VAE, train_vae
from pygeo.optim import NaturalGradient, sampled_nll
from pygeo.optim.kfac import _connection_covector


def linear_data(N, n_in=4, n_out=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    layer = nn.Linear(n_in, n_out).double()
    a = torch.randn(N, n_in, generator=generator, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5, 1.5][:n_in],
                                                                                     dtype=torch.float64) + 0.3
    return layer, a


def test_linear_factors_equal_their_definitions_on_the_same_samples():
    layer, a = linear_data(50)
    optimizer = NaturalGradient(layer, factor_decay=0.0, outputs=None)
    targets = torch.randn(50, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = layer(a)
    optimizer.update_curvature(0.5 * ((y - targets) / 0.4).square().sum())
    A, G = optimizer.kronecker_factors()[""]
    rows = torch.cat([a, torch.ones(50, 1, dtype=torch.float64)], 1)
    residual = (y.detach() - targets) / 0.4 ** 2  # the per-example gradient of the loss at the layer's output
    torch.testing.assert_close(A, rows.T @ rows / 50, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(G, residual.T @ residual / 50, rtol=1e-12, atol=1e-12)


def test_single_linear_gaussian_kfac_matches_the_brute_force_fisher():
    """For one linear layer with a Gaussian output the Fisher is exactly E[a a^T] (x) I / sigma^2: K-FAC with sampled
    targets must match the Fisher built from per-example Jacobians, up to the Monte Carlo error of the targets."""
    N, sigma = 20000, 0.5
    layer, a = linear_data(N)
    torch.manual_seed(0)
    optimizer = NaturalGradient(layer, factor_decay=0.0, outputs=None)
    optimizer.update_curvature(sampled_nll(layer(a), "gaussian", sigma=sigma))
    A, G = optimizer.kronecker_factors()[""]
    kfac = torch.kron(G, A)  # parameters [W b] flattened row-major: the per-example gradient is g (x) a

    def output(theta, point):
        M = theta.reshape(3, 5)
        return M[:, :4] @ point + M[:, 4]
    theta = torch.cat([layer.weight, layer.bias.unsqueeze(1)], 1).detach().reshape(-1)
    J = torch.func.vmap(torch.func.jacrev(output), in_dims=(None, 0))(theta, a[:2000])  # [n, 3, 15]
    brute = torch.einsum("nop,noq->pq", J, J) / 2000 / sigma ** 2
    # the deterministic part (A) on the same 2000 points; the sampled part (G) within Monte Carlo error
    A_part = torch.cat([a[:2000], torch.ones(2000, 1, dtype=torch.float64)], 1)
    expected = torch.kron(torch.eye(3, dtype=torch.float64) / sigma ** 2, A_part.T @ A_part / 2000)
    torch.testing.assert_close(brute, expected, rtol=1e-10, atol=1e-10)  # the brute force is what K-FAC should be
    torch.testing.assert_close(G, torch.eye(3, dtype=torch.float64) / sigma ** 2, rtol=0, atol=0.08 / sigma ** 2)
    full_A = torch.cat([a, torch.ones(N, 1, dtype=torch.float64)], 1)
    torch.testing.assert_close(kfac, torch.kron(torch.eye(3, dtype=torch.float64) / sigma ** 2, full_A.T @ full_A / N),
                               rtol=0, atol=0.05 * float(kfac.abs().max()))
    assert float((kfac - brute).abs().max()) < 0.06 * float(brute.abs().max())


def test_conv2d_factors_against_explicit_patches():
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, kernel_size=3, padding=1, stride=2).double()
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    optimizer = NaturalGradient(conv, factor_decay=0.0, outputs=None)
    out = conv(x)
    out.retain_grad()
    targets = torch.randn_like(out)
    loss = 0.5 * (out - targets).square().sum()
    optimizer.update_curvature(loss)
    A, G = optimizer.kronecker_factors()[""]
    padded = nn.functional.pad(x, (1, 1, 1, 1))
    patches, grads = [], []
    for n in range(4):
        for i in range(out.shape[2]):
            for j in range(out.shape[3]):
                patch = padded[n, :, 2 * i:2 * i + 3, 2 * j:2 * j + 3].reshape(-1)
                patches.append(torch.cat([patch, torch.ones(1, dtype=torch.float64)]))
                grads.append(out[n, :, i, j].detach() - targets[n, :, i, j])
    patches, grads = torch.stack(patches), torch.stack(grads)
    torch.testing.assert_close(A, patches.T @ patches / len(patches), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(G, grads.T @ grads / 4, rtol=1e-12, atol=1e-12)  # summed over positions, per example


def test_step_is_the_damped_kronecker_natural_gradient():
    layer, a = linear_data(40)
    optimizer = NaturalGradient(layer, lr=0.3, damping=1e-2, momentum=0.0, factor_decay=0.0, kl_clip=None,
                                outputs=None)
    before = torch.cat([layer.weight, layer.bias.unsqueeze(1)], 1).detach().clone()
    y = layer(a)
    optimizer.zero_grad()
    torch.manual_seed(0)
    optimizer.update_curvature(sampled_nll(y, "gaussian"))
    loss = 0.5 * (y - 1.0).square().sum(-1).mean()
    loss.backward()
    gradient = torch.cat([layer.weight.grad, layer.bias.grad.unsqueeze(1)], 1)
    optimizer.step()
    A, G = optimizer.kronecker_factors()[""]
    pi = ((A.trace() / 5) / (G.trace() / 3)).sqrt()
    eye = functools.partial(torch.eye, dtype=torch.float64)
    inverse_A = torch.linalg.inv(A + 0.1 * pi * eye(5))
    expected = before - 0.3 * torch.linalg.solve(G + 0.1 / pi * eye(3), gradient) @ inverse_A
    after = torch.cat([layer.weight, layer.bias.unsqueeze(1)], 1).detach()
    torch.testing.assert_close(after, expected, rtol=1e-10, atol=1e-12)


def demo_data():
    images, _ = load_digits(None, limit=256)
    return images


def test_trains_the_demo_vae_without_nan_and_deterministically():
    images = demo_data()
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = VAE(latent_dim=2, hidden=(64, 32))
        losses = train_vae(model, images, epochs=2, batch_size=64, lr=0.05, seed=3, progress=False,
                           optimizer="natural", optimizer_options=dict(curvature_every=2))
        assert all(torch.isfinite(torch.tensor(losses)))
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
        runs.append((losses, [p.detach().clone() for p in model.parameters()]))
    assert runs[0][0][-1] < runs[0][0][0]  # it learns
    assert runs[0][0] == runs[1][0]
    for first, second in zip(runs[0][1], runs[1][1]):
        assert torch.equal(first, second)
    # the hooks are gone after training: a later forward pass records nothing
    assert not model.encoder.body[0]._forward_hooks


def test_state_dict_round_trip_continues_identically():
    images = demo_data()[:128]
    torch.manual_seed(0)
    model = VAE(latent_dim=2, hidden=(32,))
    optimizer = NaturalGradient(model, lr=0.05, curvature_every=3)

    def train(model, optimizer, steps, seed):
        torch.manual_seed(seed)
        for _ in range(steps):
            optimizer.zero_grad()
            loss = model.loss(images)
            optimizer.update_curvature()
            loss.backward()
            optimizer.step()

    train(model, optimizer, 4, seed=1)
    saved_model, saved_state = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    assert any("factor_A" in entry for entry in saved_state["state"].values())
    train(model, optimizer, 4, seed=2)

    restored = VAE(latent_dim=2, hidden=(32,))
    restored.load_state_dict(saved_model)
    restored_optimizer = NaturalGradient(restored, lr=0.05, curvature_every=3)
    restored_optimizer.load_state_dict(saved_state)
    assert restored_optimizer.param_groups[0]["steps_taken"] == 4
    train(restored, restored_optimizer, 4, seed=2)
    for first, second in zip(model.parameters(), restored.parameters()):
        torch.testing.assert_close(first, second, rtol=0, atol=0)


def test_curvature_refresh_cadence_and_no_op_steps():
    layer, a = linear_data(10)
    optimizer = NaturalGradient(layer, curvature_every=3, outputs=None)
    refreshed = []
    for _ in range(7):
        optimizer.zero_grad()
        y = layer(a)
        refreshed.append(optimizer.update_curvature(sampled_nll(y, "gaussian")))
        y.square().mean().backward()
        optimizer.step()
    assert refreshed == [True, False, False, True, False, False, True]


def test_unfactored_layers_fall_back_to_the_identity_preconditioner():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Identity(),
                          nn.Linear(4, 2)).double()
    optimizer = NaturalGradient(model, lr=0.1, momentum=0.0, kl_clip=None, outputs=None)
    assert set(optimizer.factored) == {"0", "3"}
    layer_norm = model[1]
    assert {id(p) for p in optimizer.fallback} == {id(layer_norm.weight), id(layer_norm.bias)}
    x = torch.randn(8, 3, dtype=torch.float64)
    before = layer_norm.weight.detach().clone()
    y = model(x)
    optimizer.update_curvature(sampled_nll(y, "gaussian"))
    y.square().sum().backward()
    expected = before - 0.1 * layer_norm.weight.grad
    optimizer.step()
    torch.testing.assert_close(layer_norm.weight.detach(), expected)


def test_vae_sampled_loss_uses_the_posterior_and_decoder_likelihoods():
    """The automatic sampled-target loss: its encoder-side G factor on the log-variance head has expectation
    2 / 4 = 1/2 per unit (Fisher 2 in log sigma = logvar / 2), checked with many samples."""
    torch.manual_seed(0)
    model = VAE(data_dim=6, latent_dim=2, hidden=(5,))
    optimizer = NaturalGradient(model, factor_decay=0.0)
    x = torch.rand(20000, 6)
    loss = model.loss(x)
    optimizer.update_curvature()
    _, G = optimizer.kronecker_factors()["encoder.log_variance"]
    torch.testing.assert_close(G.diagonal(), torch.full((2,), 0.5), rtol=0.05, atol=0)
    assert loss.requires_grad


def test_clear_errors():
    layer = nn.Linear(3, 2)
    with pytest.raises(TypeError, match="model"):
        NaturalGradient([layer.weight])
    with pytest.raises(ValueError, match="lr"):
        NaturalGradient(layer, lr=-1.0)
    with pytest.raises(ValueError, match="damping"):
        NaturalGradient(layer, damping=0.0)
    with pytest.raises(ValueError, match="curvature_every"):
        NaturalGradient(layer, curvature_every=0)
    with pytest.raises(ValueError, match="momentum"):
        NaturalGradient(layer, momentum=1.0)
    with pytest.raises(ValueError, match="outputs"):
        NaturalGradient(VAE(data_dim=4, hidden=(3,)), outputs={"decoder": "poisson"})
    with pytest.raises(ValueError, match="not a submodule"):
        NaturalGradient(VAE(data_dim=4, hidden=(3,)), outputs={"head": "bernoulli"})
    optimizer = NaturalGradient(layer)
    layer(torch.randn(4, 3))
    with pytest.raises(ValueError, match="fisher_loss"):
        optimizer.update_curvature()
    with pytest.raises(RuntimeError, match="no forward pass"):
        optimizer.update_curvature(torch.zeros((), requires_grad=True))
    inplace = nn.Sequential(nn.Linear(3, 2), nn.ReLU(inplace=True))
    optimizer = NaturalGradient(inplace, outputs=None)
    y = inplace(torch.randn(4, 3))
    with pytest.raises(RuntimeError, match="in place"):
        optimizer.update_curvature(sampled_nll(y, "gaussian"))
    with pytest.raises(ValueError, match="kind"):
        sampled_nll(y, "poisson")


# ------------------------------------------------------------------------- low-rank step and geodesic correction
def small_vae_batch(dtype=torch.float64, N=9, D=30, seed=0):
    torch.manual_seed(seed)
    x = torch.rand(N, D).round().to(dtype)
    return VAE(data_dim=D, latent_dim=3, hidden=(40, 7)).to(dtype), x


def run_steps(model, x, steps=3, seed=1, **options):
    optimizer = NaturalGradient(model, curvature_every=2, **options)
    torch.manual_seed(seed)
    for _ in range(steps):
        loss = model.loss(x)
        optimizer.zero_grad()
        optimizer.update_curvature()
        loss.backward()
        optimizer.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()]), optimizer


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_low_rank_step_equals_the_dense_step(dtype):
    """Batch 9 against layers 30 and 40 wide: (G^-1 delta^T)(a A^-1) is the same product as G^-1 (delta^T a) A^-1,
    up to rounding (float64: ~1e-13; float32: ~1e-5 relative)."""
    model, x = small_vae_batch(dtype)
    dense, _ = run_steps(copy.deepcopy(model), x, low_rank=False, kl_clip=1e-2)
    low, optimizer = run_steps(copy.deepcopy(model), x, low_rank=True, kl_clip=1e-2)
    tolerance = 1e-11 if dtype == torch.float64 else 2e-4
    torch.testing.assert_close(low, dense, rtol=tolerance, atol=tolerance * float(dense.abs().max()))
    assert not torch.equal(low, torch.cat([p.detach().flatten() for p in model.parameters()]))  # it moved


def test_low_rank_refuses_an_edited_gradient():
    model, x = small_vae_batch()
    optimizer = NaturalGradient(model, low_rank=True)
    loss = model.loss(x)
    optimizer.update_curvature()
    loss.backward()
    optimizer.step()
    loss = model.loss(x)
    optimizer.zero_grad()
    loss.backward()
    for p in model.parameters():
        p.grad.mul_(0.5)  # e.g. clipping: the recorded factors no longer give .grad
    with pytest.raises(RuntimeError, match="low_rank=True"):
        optimizer.step()


def test_geodesic_correction_is_second_order_and_matches_the_exact_christoffel_term():
    """One step from the same state with and without the correction: the difference is -1/2 P J^T w(delta) (w from
    the exact first and second directional derivatives of the VAE's outputs by forward-mode autograd), up to a
    relative error that shrinks linearly with lr (J^T evaluated at theta + delta), and it scales as lr^2."""
    from torch.func import functional_call, jvp

    base, x = small_vae_batch()
    corrections = []
    for lr in (1e-3, 1e-4):
        results = []
        for geodesic in (False, True):
            model = copy.deepcopy(base)
            optimizer = NaturalGradient(model, lr=lr, momentum=0.0, kl_clip=None, geodesic_correction=geodesic)
            start = {k: v.detach().clone() for k, v in model.named_parameters()}
            torch.manual_seed(1)
            loss = model.loss(x)
            with torch.no_grad():
                mu, _ = model.encoder(x)
            torch.manual_seed(1)
            noise = torch.randn_like(mu)  # the reparameterisation noise of that forward pass
            optimizer.zero_grad()
            optimizer.update_curvature()
            loss.backward()
            optimizer.step()
            results.append(({k: v.detach().clone() for k, v in model.named_parameters()}, optimizer, model))
        (plain, _, _), (corrected, optimizer, model) = results
        names = list(start)
        delta = {k: plain[k] - start[k] for k in names}

        def outputs(parameters):
            encoder = {k[8:]: v for k, v in parameters.items() if k.startswith("encoder.")}
            decoder = {k[8:]: v for k, v in parameters.items() if k.startswith("decoder.")}
            mu, logvar = functional_call(model.encoder, encoder, (x,))
            return functional_call(model.decoder, decoder, (mu + noise * (0.5 * logvar).exp(),)), mu, logvar
        centre = outputs(start)
        _, u = jvp(outputs, (start,), (delta,))
        _, r = jvp(lambda p: jvp(outputs, (p,), (delta,))[1], (start,), (delta,))
        plus = [c + ui + ri / 2 for c, ui, ri in zip(centre, u, r)]
        minus = [c - ui + ri / 2 for c, ui, ri in zip(centre, u, r)]
        w_decoder = _connection_covector("bernoulli", centre[0], plus[0], minus[0], 0.0)
        w_mu, w_logvar = _connection_covector("posterior", centre[1:], tuple(plus[1:]), tuple(minus[1:]), 0.0)
        leaves = {k: start[k].clone().requires_grad_() for k in names}
        decoded, mu, logvar = outputs(leaves)
        pairing = ((w_decoder * decoded).sum() + (w_mu * mu).sum() + (w_logvar * logvar).sum()) / len(x)
        pulled = torch.autograd.grad(pairing, [leaves[k] for k in names])
        by_id = dict(model.named_parameters())
        preconditioned = optimizer._precondition_covectors({id(by_id[k]): g for k, g in zip(names, pulled)})
        exact = torch.cat([(-0.5 * preconditioned[id(by_id[k])]).flatten() for k in names])
        measured = torch.cat([(corrected[k] - plain[k]).flatten() for k in names])
        error = float((measured - exact).norm() / exact.norm())
        assert error < 200 * lr, (lr, error)
        assert optimizer.last_geodesic_ratio < 1  # the cap was not active
        corrections.append(float(measured.norm()))
    assert corrections[0] / corrections[1] == pytest.approx(100, rel=0.05)  # O(lr^2)


def test_connection_covector_posterior_levi_civita_matches_the_metric():
    """alpha = 0 for N(mu, exp(s)): the Christoffel term of the metric diag(exp(-s), 1/2) by autograd."""
    torch.manual_seed(0)
    mu, s, u_mu, u_s = (torch.randn(5, dtype=torch.float64) for _ in range(4))
    w_mu, w_s = _connection_covector("posterior", (mu, s), (mu + u_mu, s + u_s), (mu - u_mu, s - u_s), 0.0)

    def metric_energy(point, velocity):  # u^T g(point) u / 2 with g = diag(exp(-s), 1/2)
        return 0.5 * (velocity[0].square() * (-point[1]).exp() + 0.5 * velocity[1].square())
    # Gamma_k(u, u) = d/dt (g u)_k along u - 1/2 d_k (u^T g u): for diagonal g, d_s g_mumu = -exp(-s)
    expected_mu = -u_mu * u_s * (-s).exp()
    expected_s = 0.5 * u_mu.square() * (-s).exp()
    torch.testing.assert_close(w_mu, expected_mu)
    torch.testing.assert_close(w_s, expected_s)
    point = torch.stack([mu, s]).requires_grad_()
    velocity = torch.stack([u_mu, u_s])
    grad_point = torch.autograd.grad(metric_energy(point, velocity).sum(), point)[0]
    torch.testing.assert_close(-grad_point[1], expected_s)  # the -1/2 d_s (u^T g u) part is the whole s term


def test_geodesic_correction_errors():
    layer = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="geodesic_correction"):
        NaturalGradient(layer, geodesic_correction=True, outputs=None)
    with pytest.raises(ValueError, match="low_rank"):
        NaturalGradient(layer, low_rank="yes")


def test_geodesic_correction_with_an_explicit_forward():
    """A regression net with a Gaussian output (outputs dict): the correction needs step(forward=...), and it is
    O(lr^2) against the plain step."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(3, 9), nn.Tanh(), nn.Linear(9, 2)).double()
    x = torch.randn(7, 3, dtype=torch.float64)
    sizes = []
    for lr in (1e-3, 1e-4):
        finals = []
        for geodesic in (False, True):
            model = copy.deepcopy(base)
            optimizer = NaturalGradient(model, lr=lr, momentum=0.0, kl_clip=None, outputs={"": "gaussian"},
                                        geodesic_correction=geodesic)
            torch.manual_seed(2)
            y = model(x)
            optimizer.zero_grad()
            optimizer.update_curvature()
            (y - 1.0).square().sum().backward()
            if geodesic:
                with pytest.raises(ValueError, match="forward"):
                    optimizer.step()
            optimizer.step(forward=lambda: model(x))
            finals.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
        sizes.append(float((finals[1] - finals[0]).norm()))
    assert sizes[1] > 0
    assert sizes[0] / sizes[1] == pytest.approx(100, rel=0.1)
