"""pygeo.optim.NaturalGradient against curvlinops' KFACLinearOperator (curvlinops-for-pytorch, a test-only
dependency): the Kronecker factors and the preconditioned step of a small VAE's decoder layers on one batch.

curvlinops handles one standard loss on one model output, so the comparison is on the VAE's decoder (z -> logits,
BCEWithLogitsLoss with reduction="sum") at the latents z that the VAE's own forward pass sampled:
- the empirical variant (the same targets on both sides): factors and step agree to rounding;
- the Monte Carlo variant (targets sampled from the model): pygeo's sampled G against curvlinops' type-2 Fisher
  (the exact expectation over the targets), within the Monte Carlo error.
Scaling: curvlinops' G with reduction="sum" is a sum over the examples, pygeo's a mean (N times smaller); A is the same
mean. With heuristic damping N * damping, curvlinops' damped factors are then (A + pi sqrt(d) I, N (G + sqrt(d) / pi
I)): its inverse times N is pygeo's step.
"""
import copy

import pytest
import torch

from pygeo.models import VAE
from pygeo.optim import NaturalGradient

curvlinops = pytest.importorskip("curvlinops", reason="curvlinops-for-pytorch is not installed (pip install "
                                 "curvlinops-for-pytorch): the K-FAC cross-check needs it")


def vae_batch(dtype, seed=0, N=37, D=23, latent=3, hidden=(11, 6)):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = VAE(data_dim=D, latent_dim=latent, hidden=hidden).to(dtype)
    x = (torch.rand(N, D, generator=generator, dtype=dtype) > 0.5).to(dtype)
    return model, x


def one_step(model, x, fisher, lr=0.5, damping=1e-2):
    """One NaturalGradient step (factor_decay 0, no momentum or clip) with an explicit fisher_loss built by
    `fisher(decoded, mu, logvar)`; returns (optimizer, decoder latents z, parameters before, gradients)."""
    optimizer = NaturalGradient(model, lr=lr, damping=damping, momentum=0.0, factor_decay=0.0, kl_clip=None,
                                outputs=None)
    captured = {}
    hook = model.decoder.register_forward_hook(lambda _m, inputs, _o: capture(captured, inputs))
    decoded, mu, logvar = model(x)
    hook.remove()
    loss = -(model.log_likelihood(x, decoded) - 0.5 * (mu.square() + logvar.exp() - 1 - logvar).sum(-1)).mean()
    optimizer.zero_grad()
    optimizer.update_curvature(fisher(decoded, mu, logvar))
    loss.backward()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    gradients = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    optimizer.step()
    return optimizer, captured["z"], before, gradients


def capture(captured, inputs):
    captured.setdefault("z", inputs[0].detach())  # returns None: a forward hook's return value replaces the output


def decoder_layers(decoder):
    return [(name, module) for name, module in decoder.named_modules() if isinstance(module, torch.nn.Linear)]


def curvlinops_kfac(decoder, z, targets, fisher_type):
    parameters = [p for p in decoder.parameters()]
    return curvlinops.KFACLinearOperator(decoder, torch.nn.BCEWithLogitsLoss(reduction="sum"), parameters,
                                         [(z, targets)], fisher_type=fisher_type, separate_weight_and_bias=False,
                                         check_deterministic=False)


def kfac_factors(operator):
    operator._compute_kfac() if hasattr(operator, "_compute_kfac") else operator @ [
        torch.zeros_like(p) for p in operator._params]
    return operator._input_covariances, operator._gradient_covariances


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_empirical_factors_and_step_match_curvlinops(dtype):
    model, x = vae_batch(dtype)
    N = len(x)
    targets = (torch.rand(N, x.shape[1], generator=torch.Generator().manual_seed(5), dtype=dtype) > 0.3).to(dtype)
    damping, lr = 1e-2, 0.5

    def fisher(decoded, mu, logvar):  # the decoder's negative log-likelihood at fixed targets (the empirical variant)
        return torch.nn.functional.binary_cross_entropy_with_logits(decoded, targets, reduction="sum")
    optimizer, z, before, gradients = one_step(model, x, fisher, lr=lr, damping=damping)
    ours = optimizer.kronecker_factors()
    optimizer.remove_hooks()

    decoder = copy.deepcopy(model.decoder)
    for name, p in decoder.named_parameters():
        p.data.copy_(before["decoder." + name])
    operator = curvlinops_kfac(decoder, z, targets, "empirical")
    inputs, grads = kfac_factors(operator)
    tolerance = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-4, atol=1e-6)
    for name, _ in decoder_layers(decoder):
        A, G = ours["decoder." + name]
        torch.testing.assert_close(A, inputs[name], **tolerance)
        torch.testing.assert_close(G * N, grads[name], **tolerance)

    inverse = curvlinops.KFACInverseLinearOperator(operator, damping=N * damping, use_heuristic_damping=True)
    names = [name for name, _ in decoder.named_parameters()]
    theirs = inverse @ [gradients["decoder." + name] for name in names]
    for name, direction in zip(names, theirs):
        step = (before["decoder." + name] - dict(model.named_parameters())["decoder." + name].detach()) / lr
        scale = float(step.abs().max())
        torch.testing.assert_close(step, N * direction, rtol=tolerance["rtol"] * 10,
                                   atol=tolerance["rtol"] * 10 * scale)


def test_monte_carlo_factors_match_the_type2_fisher_within_sampling_error():
    """pygeo's true-Fisher K-FAC (targets sampled from the decoder, outputs='auto' on the VAE) against curvlinops'
    type-2 Fisher, the exact expectation over the targets: G agrees within the Monte Carlo error of one sample per
    example (relative Frobenius error ~ 1 / sqrt(N)), A exactly."""
    model, x = vae_batch(torch.float64, N=4000, D=9, hidden=(7, 5))
    optimizer = NaturalGradient(model, factor_decay=0.0)
    captured = {}
    hook = model.decoder.register_forward_hook(lambda _m, inputs, _o: capture(captured, inputs))
    torch.manual_seed(3)
    loss = model.loss(x)
    hook.remove()
    optimizer.update_curvature()
    ours = optimizer.kronecker_factors()
    operator = curvlinops_kfac(model.decoder, captured["z"], x, "type-2")
    inputs, grads = kfac_factors(operator)
    for name, _ in decoder_layers(model.decoder):
        A, G = ours["decoder." + name]
        torch.testing.assert_close(A, inputs[name], rtol=1e-10, atol=1e-12)
        expected = grads[name] / len(x)
        error = float((G - expected).norm() / expected.norm())
        assert error < 0.1, (name, error)
    # the same comparison with a wrong Fisher (the empirical one at the data) is far off: the test can fail
    empirical = curvlinops_kfac(model.decoder, captured["z"], x, "empirical")
    _, wrong = kfac_factors(empirical)
    last = decoder_layers(model.decoder)[-1][0]
    assert float((wrong[last] - grads[last]).norm() / grads[last].norm()) > 0.1
    assert loss.requires_grad
