"""NaturalGradient: K-FAC (Martens & Grosse 2015; Grosse & Martens 2016 for convolutions) with the Fisher of the
model's own likelihoods, in the torch.optim pattern (MATH.md section 6).

The Fisher of a layer with weight W (bias as an extra input column) is approximated by a Kronecker product
F_W ~ A (x) G, A = E[a a^T] over the layer's inputs a, G = E[g g^T] over the gradients g of the model's negative
log-likelihood with respect to the layer's outputs, the targets *sampled from the model's own output distribution*
(the true Fisher, not the empirical one built from the data's labels). The natural gradient of the weight is then
G^-1 grad_W A^-1, with Tikhonov damping split between the factors (A + pi sqrt(damping) I, G + sqrt(damping)/pi I,
pi^2 = (tr A / dim A) / (tr G / dim G)).

Which likelihoods: for a VAE (a model with .encoder returning (mu, logvar) and .decoder returning its output
distribution's parameters) the sampled-target loss is the sum of
    - the decoder's output distribution at sampled targets: Bernoulli(logits) or Gaussian with the model's fixed
      sigma (model.sigma, else 1), or the learned-std Gaussian when the decoder returns (mean, std): the same F as
      pygeo.PullbackMetric (p(1-p) on the logits, 1/sigma^2 on the mean, 2 on log std);
    - the encoder's Gaussian posterior q(z | x) at z ~ q: Fisher diag(1/sigma^2) on the mean and 2 on log sigma.
The two samples are independent and each score has mean zero, so their cross terms vanish in expectation and the
encoder's layers see the sum of the posterior's Fisher and the decoder's Fisher pulled back through the
reparameterised sample (the Gauss-Newton matrix of the reconstruction term). Any other model passes its own
sampled-target loss to update_curvature (sampled_nll builds one per output).

How the sampled-target backward fits the torch.optim pattern: forward hooks on every factored layer record its input
and output (only on steps where the factors are due, so other steps cost nothing), and
`optimizer.update_curvature()` — called between the forward pass and loss.backward() — differentiates the
sampled-target loss with respect to those recorded outputs (torch.autograd.grad with retain_graph=True), which gives
the per-example g without touching .grad and without computing any weight gradient twice:

    optimizer = NaturalGradient(vae, lr=0.1, damping=1e-2)
    for x in batches:
        optimizer.zero_grad()
        loss = vae.loss(x)
        optimizer.update_curvature()      # a no-op except every `curvature_every` steps
        loss.backward()
        optimizer.step()

Layers: nn.Linear (any leading dimensions) and nn.Conv2d (groups=1, zero padding; K-FAC's "KFC" factors over
unfolded patches, spatial locations counted as extra samples for A) are factored. Every other parameter (norm layers,
grouped convolutions, embeddings, bare parameters) falls back to the identity preconditioner: it takes the plain
gradient with the same lr and momentum (i.e. SGD), and its step is included in the KL clipping below.

Step: v = preconditioned gradient (+ weight_decay * p before preconditioning), scaled by
nu = min(1, sqrt(kl_clip / (lr^2 sum v . grad))) (the trust region of Ba et al. 2017, which keeps early steps, taken
with still-poor factors, from blowing up), then heavy-ball momentum, p <- p - lr * buffer.

Low-rank step: when a Linear layer's batch rows R are fewer than its width, the gradient delta^T a (per-example output
gradients delta [R, out] caught by a tensor hook in the backward, inputs a [R, in(+1)] from the forward) is
preconditioned as (G^-1 delta^T)(a A^-1), R (out^2 + in^2 + out in) flops instead of out in (out + in); low_rank="auto"
picks the cheaper form per layer and step. It needs .grad to be exactly what the recorded backward produced: the bias
gradient (sum of delta) is compared, and an edited gradient (clipping) falls back to the dense product with a warning
(low_rank=True raises instead). The inverses are refreshed with the factors only (every curvature_every steps), in the
parameters' dtype; momentum and the update are one foreach pass over all parameters.

Geodesic correction (geodesic_correction=True; Song, Song & Ermon, ICML 2018; MATH.md section 6): the step delta is
replaced by delta - 1/2 Gamma(delta, delta), Gamma the alpha-connection (geodesic_alpha; 0 = Levi-Civita of the
Fisher) of the model's output distributions pulled back through the network, F^-1 E_x[J^T w], with w from central
differences of the outputs at theta +- delta (two extra forward passes) and J^T w by one backward at theta + delta,
preconditioned by the same damped K-FAC inverse. The result agrees with the geodesic to second order (the error of
the correction itself is O(|delta|) relative: tests/test_optim_kfac.py). The correction is capped at the step's norm
(last_geodesic_ratio reports the uncapped ratio). A VAE (outputs="auto") is re-run from its recorded input and
reparameterisation noise; other models pass step(forward=...).

Cross-check (tests/test_kfac_curvlinops.py, curvlinops-for-pytorch 3.0.1 KFACLinearOperator, BCEWithLogitsLoss with
reduction "sum", separate_weight_and_bias=False): on a small VAE's decoder layers and one batch, with the same targets
(curvlinops' "empirical" Fisher), A agrees and curvlinops' G equals N times pygeo's (a sum over examples against a
mean) to 1e-10 relative in float64 (2e-4 in float32), and pygeo's step equals N times KFACInverseLinearOperator
(heuristic damping N * damping) applied to the gradient; with sampled targets pygeo's G matches curvlinops' "type-2"
(exact expectation) Fisher within the Monte Carlo error (< 10 % relative Frobenius error at N = 4000). The encoder's
layers (two likelihoods joined by the reparameterised sample) are outside what curvlinops models and are tested
against brute-force Fishers instead.
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch import nn
from torch.nn import functional as F

from .. import _checks, _linalg

OUTPUT_KINDS = ("bernoulli", "gaussian", "posterior")


def sampled_nll(output, kind: str, sigma: Optional[float] = None) -> torch.Tensor:
    """Sum over the batch of -log p(t | output) at targets t sampled from the output's own distribution (detached):
    the loss whose gradient's second moment is the true Fisher. Uses torch's global random generator.

    kind: "bernoulli" (output = logits), "gaussian" (output = mean with the fixed sigma, default 1, or a pair
    (mean, std)), "posterior" (output = (mu, logvar) of q(z | x) = N(mu, exp(logvar))).
    """
    if kind == "bernoulli":
        target = torch.bernoulli(torch.sigmoid(output.detach()))
        return F.binary_cross_entropy_with_logits(output, target, reduction="sum")
    if kind == "gaussian":
        if isinstance(output, (tuple, list)):
            mean, std = output
            target = mean.detach() + std.detach() * torch.randn_like(mean)
            return (0.5 * ((target - mean) / std).square() + std.log()).sum()
        scale = 1.0 if sigma is None else float(sigma)
        target = output.detach() + scale * torch.randn_like(output)
        return 0.5 * (target - output).square().sum() / scale ** 2
    if kind == "posterior":
        mu, logvar = output
        target = mu.detach() + (0.5 * logvar.detach()).exp() * torch.randn_like(mu)
        return (0.5 * (target - mu).square() * (-logvar).exp() + 0.5 * logvar).sum()
    raise ValueError(f"kind must be one of {OUTPUT_KINDS}, got {kind!r}")


class NaturalGradient(torch.optim.Optimizer):
    """K-FAC natural-gradient optimiser for the parameters of `model` (see the module docstring for the maths).

    Args:
        model: the nn.Module whose parameters are optimised (all that require grad).
        lr: step size of the preconditioned (natural) gradient.
        damping: Tikhonov damping lambda of the Fisher, F + lambda I, split between the Kronecker factors.
        momentum: heavy-ball momentum on the preconditioned step (0 for none).
        weight_decay: L2 coefficient added to the gradient before preconditioning.
        curvature_every: refresh the Kronecker factors (and their inverses) every this many steps (the first step
            included); update_curvature() is a no-op on the others.
        factor_decay: exponential moving average of the factors across refreshes (0 keeps only the latest batch).
        kl_clip: trust-region bound on lr^2 v . grad (None to disable).
        outputs: how the sampled-target loss is built when update_curvature() gets none: "auto" (a model with
            .encoder -> (mu, logvar) and .decoder: the decoder's likelihood from model.likelihood, default
            "bernoulli", and model.sigma; the encoder's Gaussian posterior), a dict {submodule name: kind} with kind in
            OUTPUT_KINDS, or None (update_curvature then needs an explicit loss).
        low_rank: "auto" (the low-rank product where it is cheaper), True (always for Linear layers; RuntimeError
            when .grad was edited after the backward) or False (always dense).
        geodesic_correction: add the second-order geodesic correction -1/2 Gamma(delta, delta) to every step (about
            one extra forward-backward per step; needs outputs, and step(forward=...) unless outputs="auto").
        geodesic_alpha: the alpha of the alpha-connection used by the correction (0: Levi-Civita, 1: exponential).

    Raises ValueError / TypeError for out-of-range settings (named in the message).
    """

    def __init__(self, model: nn.Module, lr: float = 0.1, damping: float = 1e-2, momentum: float = 0.9,
                 weight_decay: float = 0.0, curvature_every: int = 10, factor_decay: float = 0.95,
                 kl_clip: Optional[float] = 1e-2, outputs: Union[str, Dict[str, str], None] = "auto",
                 low_rank: Union[str, bool] = "auto", geodesic_correction: bool = False,
                 geodesic_alpha: float = 0.0):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        for name, value in (("lr", lr), ("damping", damping)):
            value = _checks.number(name, value)
            if not 0 < value < math.inf:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        for name, value in (("momentum", momentum), ("factor_decay", factor_decay)):
            if not 0 <= _checks.number(name, value) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        if not 0 <= _checks.number("weight_decay", weight_decay) < math.inf:
            raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
        if isinstance(curvature_every, bool) or not isinstance(curvature_every, int) or curvature_every < 1:
            raise ValueError(f"curvature_every must be a positive int, got {curvature_every!r}")
        if kl_clip is not None and not 0 < _checks.number("kl_clip", kl_clip) < math.inf:
            raise ValueError(f"kl_clip must be a finite number > 0 or None, got {kl_clip!r}")
        if low_rank not in ("auto", True, False):
            raise ValueError(f"low_rank must be 'auto', True or False, got {low_rank!r}")
        if not isinstance(geodesic_correction, bool):
            raise TypeError(f"geodesic_correction must be a bool, got {type(geodesic_correction).__name__}")
        if not math.isfinite(_checks.number("geodesic_alpha", geodesic_alpha)):
            raise ValueError(f"geodesic_alpha must be a finite number, got {geodesic_alpha!r}")
        parameters = [p for p in model.parameters() if p.requires_grad]
        if not parameters:
            raise ValueError("model has no parameters that require grad")
        defaults = dict(lr=float(lr), damping=float(damping), momentum=float(momentum),
                        weight_decay=float(weight_decay), curvature_every=curvature_every,
                        factor_decay=float(factor_decay), kl_clip=None if kl_clip is None else float(kl_clip),
                        steps_taken=0)
        super().__init__(parameters, defaults)
        self.model = model
        self._outputs = self._resolve_outputs(model, outputs)
        self.low_rank = low_rank
        self.geodesic_correction = geodesic_correction
        self.geodesic_alpha = float(geodesic_alpha)
        self._auto_vae = outputs == "auto" and self._outputs is not None
        if geodesic_correction and self._outputs is None:
            raise ValueError("geodesic_correction=True needs the model's output distributions: outputs='auto' (a VAE) "
                             "or a dict {submodule name: kind}")
        # ||correction|| / ||step|| of the last geodesic-corrected step, before the cap at 1 (a diagnostic)
        self.last_geodesic_ratio: Optional[float] = None
        self.factored: Dict[str, nn.Module] = {
            name: module for name, module in model.named_modules()
            if _factorable(module) and module.weight.requires_grad
            and (module.bias is None or module.bias.requires_grad)}
        factored_ids = {id(p) for module in self.factored.values() for p in _module_parameters(module)}
        self.fallback = [p for p in parameters if id(p) not in factored_ids]
        self._layer_records: Dict[nn.Module, List[Tuple[torch.Tensor, torch.Tensor, int]]] = {}
        self._output_records: List[Tuple[str, object]] = []
        # per forward call of a Linear layer: [input (detached), [gradients of the training loss at its output]]
        self._backward_records: Dict[nn.Module, List[list]] = {}
        # geodesic correction: (submodule name, kind, input, output) of every output's forward since the last step
        self._step_outputs: List[Tuple[str, str, torch.Tensor, object]] = []
        self._capture: Optional[List[Tuple[str, str, torch.Tensor, object]]] = None  # set while re-running
        self._in_fisher_backward = False
        self._hooks = [module.register_forward_hook(self._record_layer) for module in self.factored.values()]
        for name, kind in (self._outputs or {}).items():
            submodule = model.get_submodule(name)
            self._hooks.append(submodule.register_forward_hook(
                lambda _module, inputs, output, name=name, kind=kind: self._record_output(name, kind, inputs,
                                                                                          output)))
        self._warned_no_curvature = False
        self._warned_low_rank = False

    # ----------------------------------------------------------------------------------------------- public API
    @property
    def curvature_due(self) -> bool:
        """True when the next step refreshes the Kronecker factors (forward passes then record layer inputs)."""
        group = self.param_groups[0]
        return group["steps_taken"] % group["curvature_every"] == 0

    def update_curvature(self, fisher_loss: Optional[torch.Tensor] = None) -> bool:
        """Refresh the Kronecker factors from the forward pass since the last step, if they are due.

        fisher_loss: the sum over the batch (not the mean) of the negative log-likelihood at targets sampled from
            the model's own output distributions (see sampled_nll); None builds it from the `outputs` recorded in the
            forward pass. Call it after the forward pass and before loss.backward() (it needs the graph, and keeps
            it for the backward). Returns whether the factors were refreshed.
        """
        if not self.curvature_due:
            self._clear_curvature_records()
            return False
        try:
            if fisher_loss is None:
                fisher_loss = self._sampled_loss()
            records = [(module, record) for module, entries in self._layer_records.items() for record in entries]
            if not records:
                raise RuntimeError("no forward pass of a factored layer was recorded since the last step: run the "
                                   "model's forward (with grad enabled) before update_curvature()")
            outputs = [record[1] for _, record in records]
            self._in_fisher_backward = True  # the layers' gradient hooks wait for the training loss's backward
            try:
                gradients = torch.autograd.grad(fisher_loss, outputs, retain_graph=True, allow_unused=True)
            finally:
                self._in_fisher_backward = False
            per_module: Dict[nn.Module, List[Tuple[torch.Tensor, torch.Tensor, int]]] = {}
            for (module, (inputs, output, version)), gradient in zip(records, gradients):
                if output._version != version:
                    raise RuntimeError(f"the output of {_name_of(self.factored, module)} was modified in place after "
                                       "the layer ran (e.g. an inplace activation): K-FAC needs the layer's own "
                                       "output; use inplace=False")
                if gradient is not None:
                    per_module.setdefault(module, []).append((inputs, gradient))
            with torch.no_grad():
                for name, module in self.factored.items():
                    if module in per_module:
                        self._refresh_factors(module, per_module[module])
        finally:
            self._clear_curvature_records()
        return True

    def kronecker_factors(self) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """{layer name: (A [in(+1), in(+1)], G [out, out])}, the current undamped running factors (copies)."""
        factors = {}
        for name, module in self.factored.items():
            state = self.state[module.weight]
            if "factor_A" in state:
                factors[name] = (state["factor_A"].clone(), state["factor_G"].clone())
        return factors

    @torch.no_grad()
    def step(self, closure=None, forward=None):
        """One natural-gradient step from the current .grad; closure (optional) re-evaluates and returns the loss
        (call update_curvature() inside it, between its forward pass and its backward).

        forward: with geodesic_correction=True and outputs given as a dict, a callable that re-runs the step's
        forward pass (same batch, same random draws) so that the output hooks see the outputs at the displaced
        parameters; not needed for outputs='auto' (the VAE is re-run from its recorded input and noise)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        lr, momentum, weight_decay = group["lr"], group["momentum"], group["weight_decay"]
        parameters, directions = self._preconditioned(weight_decay)
        scale = 1.0
        if group["kl_clip"] is not None and parameters:
            # lr^2 v . grad over every parameter, the raw gradient paired with its preconditioned step
            predicted = float(sum((v * _gradient(p, weight_decay)).sum() for p, v in zip(parameters, directions)))
            predicted *= lr ** 2
            if predicted > group["kl_clip"]:
                scale = math.sqrt(group["kl_clip"] / predicted)
        if parameters:
            if momentum:
                buffers, fresh = [], []
                for p, v in zip(parameters, directions):
                    state = self.state[p]
                    if state.get("momentum_buffer") is None:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    buffers.append(state["momentum_buffer"])
                torch._foreach_mul_(buffers, momentum)
                torch._foreach_add_(buffers, directions, alpha=scale)
                steps = buffers
            else:
                steps = torch._foreach_mul(directions, scale)
            if self.geodesic_correction:
                displacement = torch._foreach_mul(steps, -lr)
                correction = self._geodesic_step(parameters, displacement, forward)
                torch._foreach_add_(parameters, displacement)
                if correction is not None:
                    torch._foreach_add_(parameters, correction)
            else:
                torch._foreach_add_(parameters, steps, alpha=-lr)
        group["steps_taken"] += 1
        self._clear_records()
        return loss

    def _preconditioned(self, weight_decay: float) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """(parameters with a gradient, their preconditioned gradients G^-1 grad A^-1, identity for the fallback)."""
        parameters: List[torch.Tensor] = []
        directions: List[torch.Tensor] = []
        for module in self.factored.values():
            module_parameters = _module_parameters(module)
            if all(p.grad is None for p in module_parameters):
                continue
            state = self.state[module.weight]
            if "inverse_A" not in state:
                self._warn_no_curvature()
                natural = [_gradient(p, weight_decay) for p in module_parameters]
            else:
                factors = self._low_rank_factors(module, weight_decay)
                if factors is not None:
                    # (G^-1 delta^T)(a A^-1): R (out^2 + in^2 + out in) flops instead of out in (out + in)
                    output_rows, input_rows = factors
                    matrix = (output_rows @ state["inverse_G"]).T @ (input_rows @ state["inverse_A"])
                else:
                    gradient = _as_matrix(module, [_gradient(p, weight_decay) for p in module_parameters])
                    matrix = state["inverse_G"] @ gradient @ state["inverse_A"]
                natural = _from_matrix(module, matrix)
            parameters.extend(module_parameters)
            directions.extend(natural)
        for p in self.fallback:
            if p.grad is not None:
                parameters.append(p)
                directions.append(_gradient(p, weight_decay))
        return parameters, directions

    def _low_rank_factors(self, module: nn.Module, weight_decay: float) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """(delta [R, out], a [R, in(+1)]) with grad_W = delta^T a, when the step's backward recorded them and the
        low-rank product is cheaper (or low_rank=True); None for the dense product."""
        if self.low_rank is False or weight_decay or not isinstance(module, nn.Linear):
            return None
        entries = self._backward_records.get(module)
        if not entries or any(not gradients for _, gradients in entries):
            return None
        input_rows = torch.cat([_input_rows(module, a) for a, _ in entries])
        output_rows = torch.cat([_output_rows(module, sum(gradients)) for _, gradients in entries])
        rows, outs, ins = input_rows.shape[0], output_rows.shape[1], input_rows.shape[1]
        if self.low_rank == "auto" and rows * (outs * outs + ins * ins + outs * ins) >= outs * ins * (outs + ins):
            return None
        if module.bias is not None:
            # .grad must be what the recorded backward passes produced (no clipping or edits in between): the bias
            # gradient, sum_r delta_r, checks that at O(R out) cost
            expected = output_rows.sum(0)
            tolerance = 1e-4 * float(expected.abs().max()) + 1e-30
            if module.bias.grad is None or float((module.bias.grad - expected).abs().max()) > tolerance:
                message = (f"the gradient of {_name_of(self.factored, module)} is not the one its recorded backward "
                           f"pass produced (clipped or edited after loss.backward()?)")
                if self.low_rank is True:
                    raise RuntimeError(message + ": low_rank=True needs the unmodified gradient; use low_rank=False")
                if not self._warned_low_rank:
                    warnings.warn(message + ": using the dense product", RuntimeWarning, stacklevel=4)
                    self._warned_low_rank = True
                return None
        return output_rows, input_rows

    def remove_hooks(self) -> None:
        """Detach the optimiser's forward hooks from the model (after training)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    # --------------------------------------------------------------------------------------------------- internals
    @staticmethod
    def _resolve_outputs(model: nn.Module, outputs) -> Optional[Dict[str, str]]:
        if outputs is None:
            return None
        if outputs == "auto":
            if not (hasattr(model, "encoder") and hasattr(model, "decoder")):
                return None
            likelihood = getattr(model, "likelihood", "bernoulli")
            if likelihood not in ("bernoulli", "gaussian"):
                raise ValueError(f"outputs='auto' supports a decoder likelihood 'bernoulli' or 'gaussian', the model "
                                 f"has {likelihood!r}; pass outputs=None and an explicit fisher_loss")
            return {"decoder": likelihood, "encoder": "posterior"}
        if not isinstance(outputs, dict):
            raise TypeError(f"outputs must be 'auto', None or a dict {{submodule name: kind}}, got "
                            f"{type(outputs).__name__}")
        for name, kind in outputs.items():
            if kind not in OUTPUT_KINDS:
                raise ValueError(f"outputs[{name!r}] must be one of {OUTPUT_KINDS}, got {kind!r}")
            try:
                model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"outputs names {name!r}, which is not a submodule of the model") from None
        return dict(outputs)

    def _record_layer(self, module: nn.Module, inputs, output) -> None:
        if self._capture is not None or not torch.is_grad_enabled() or not isinstance(output, torch.Tensor) \
                or not output.requires_grad:
            return
        if self.curvature_due:
            self._layer_records.setdefault(module, []).append((inputs[0].detach(), output, output._version))
        if self.low_rank is not False and isinstance(module, nn.Linear):
            entry = [inputs[0].detach(), []]
            self._backward_records.setdefault(module, []).append(entry)
            output.register_hook(lambda gradient, entry=entry: None if self._in_fisher_backward
                                 else entry[1].append(gradient.detach()))

    def _record_output(self, name: str, kind: str, inputs, output) -> None:
        if self._capture is not None:
            self._capture.append((name, kind, inputs[0] if inputs else None, output))
            return
        if not torch.is_grad_enabled():
            return
        if self.curvature_due:
            self._output_records.append((kind, output))
        if self.geodesic_correction:
            self._step_outputs.append((name, kind, inputs[0].detach() if inputs else None, _detach(output)))

    def _clear_curvature_records(self) -> None:
        self._layer_records = {}
        self._output_records = []

    def _clear_records(self) -> None:
        self._clear_curvature_records()
        self._backward_records = {}
        self._step_outputs = []

    # ------------------------------------------------------------------------------------- geodesic correction
    def _rerun(self, forward) -> List[Tuple[str, str, torch.Tensor, object]]:
        """The outputs of the step's forward pass at the current parameters, in the recorded order."""
        self._capture = []
        try:
            if forward is not None:
                forward()
            else:  # outputs='auto': the VAE from its recorded input and reparameterisation noise
                records = self._step_outputs
                for (_, _, x, (mu0, logvar0)), (_, _, z0, _) in zip(records[0::2], records[1::2]):
                    noise = (z0 - mu0) * (-0.5 * logvar0).exp()
                    mu, logvar = self.model.encoder(x)
                    self.model.decoder(mu + noise * (0.5 * logvar).exp())
            captured = self._capture
        finally:
            self._capture = None
        if len(captured) != len(self._step_outputs) or any(
                (name, kind) != (name0, kind0) for (name, kind, _, _), (name0, kind0, _, _)
                in zip(captured, self._step_outputs)):
            raise RuntimeError("the geodesic correction's re-run of the forward pass did not produce the outputs of "
                               "the step's forward pass (the same submodules, in the same order)")
        return captured

    def _geodesic_step(self, parameters: List[torch.Tensor], displacement: List[torch.Tensor],
                       forward) -> Optional[List[torch.Tensor]]:
        """-1/2 Gamma(delta, delta) for the step delta (MATH.md section 6): the output-space covector of the
        alpha-connection from central differences at theta +- delta, pulled back by one backward at theta + delta
        and preconditioned like the step. None when no forward pass was recorded."""
        if not self._step_outputs:
            self._warn_no_curvature()
            return None
        if forward is None and not self._auto_vae:
            raise ValueError("geodesic_correction=True with an outputs dict needs step(forward=...), a callable that "
                             "re-runs the step's forward pass")
        if self._auto_vae and [kind for _, kind, _, _ in self._step_outputs[:2]] != ["posterior", self._outputs[
                "decoder"]]:
            raise RuntimeError("geodesic_correction with outputs='auto' expects the VAE's encoder then decoder "
                               "forward (model.loss or model(x)); got another call order")
        sigma = getattr(self.model, "sigma", None)
        originals = [p.detach().clone() for p in parameters]
        try:
            torch._foreach_sub_(parameters, displacement)
            minus = [_detach(output) for _, _, _, output in self._rerun(forward)]
            for p, original, d in zip(parameters, originals, displacement):
                p.copy_(original).add_(d)
            with torch.enable_grad():
                plus = [output for _, _, _, output in self._rerun(forward)]
                examples = _leading(self._step_outputs[0][3])
                pairing = 0.0
                for (_, kind, _, centre), out_plus, out_minus in zip(self._step_outputs, plus, minus):
                    covector = _connection_covector(kind, centre, _detach(out_plus), out_minus, self.geodesic_alpha,
                                                    sigma if kind == "gaussian" else None)
                    for w, value in zip(_parts(covector), _parts(out_plus)):
                        pairing = pairing + (w * value).sum()
                pulled = torch.autograd.grad(pairing / examples, parameters, allow_unused=True)
        finally:
            for p, original in zip(parameters, originals):
                p.copy_(original)
        covectors = {id(p): (g if g is not None else torch.zeros_like(p)) for p, g in zip(parameters, pulled)}
        correction = self._precondition_covectors(covectors)
        ordered = [correction[id(p)] for p in parameters]
        step_norm = math.sqrt(sum(float(d.square().sum()) for d in displacement))
        correction_norm = 0.5 * math.sqrt(sum(float(c.square().sum()) for c in ordered))
        self.last_geodesic_ratio = correction_norm / step_norm if step_norm > 0 else 0.0
        # the expansion is only meaningful where the correction is small against the step: cap it at the step's size
        factor = -0.5 * min(1.0, 1.0 / self.last_geodesic_ratio) if self.last_geodesic_ratio > 1 else -0.5
        return torch._foreach_mul(ordered, factor)

    def _precondition_covectors(self, covectors: Dict[int, torch.Tensor]) -> Dict[int, torch.Tensor]:
        """The K-FAC (damped) inverse applied to covectors {id(parameter): tensor}; identity where there are no
        factors."""
        result: Dict[int, torch.Tensor] = {}
        for module in self.factored.values():
            module_parameters = [p for p in _module_parameters(module) if id(p) in covectors]
            if not module_parameters:
                continue
            state = self.state[module.weight]
            if "inverse_A" not in state or len(module_parameters) != len(_module_parameters(module)):
                result.update((id(p), covectors[id(p)]) for p in module_parameters)
                continue
            matrix = _as_matrix(module, [covectors[id(p)] for p in module_parameters])
            natural = _from_matrix(module, state["inverse_G"] @ matrix @ state["inverse_A"])
            result.update((id(p), v) for p, v in zip(module_parameters, natural))
        for key, value in covectors.items():
            result.setdefault(key, value)
        return result

    def _sampled_loss(self) -> torch.Tensor:
        if self._outputs is None:
            raise ValueError("update_curvature() needs fisher_loss for this model (outputs=None, or a model without "
                             ".encoder/.decoder): the sum over the batch of -log p(sampled target | output), e.g. "
                             "pygeo.optim.sampled_nll(output, 'bernoulli')")
        if not self._output_records:
            raise RuntimeError("no forward pass of the model's outputs was recorded since the last step: run the "
                               "model's forward (with grad enabled) before update_curvature()")
        for kind, output in self._output_records:
            parts = output if isinstance(output, (tuple, list)) else (output,)
            if not all(_checks.all_finite(part.detach()) for part in parts if part.numel()):
                raise ValueError(f"the model's {kind} output contains NaN or Inf values (training diverged?): lower "
                                 f"lr, raise damping or keep kl_clip on")
        sigma = getattr(self.model, "sigma", None)
        return sum(sampled_nll(output, kind, sigma=sigma if kind == "gaussian" else None)
                   for kind, output in self._output_records)

    def _refresh_factors(self, module: nn.Module, records: List[Tuple[torch.Tensor, torch.Tensor]]) -> None:
        group = self.param_groups[0]
        inputs = torch.cat([_input_rows(module, a) for a, _ in records])  # [R, in(+1)]
        grads = torch.cat([_output_rows(module, g) for _, g in records])  # [R, out]
        examples = sum(a.shape[0] for a, _ in records)  # batch examples (rows / examples = positions per example)
        A = inputs.T @ inputs / inputs.shape[0]
        G = grads.T @ grads / examples
        if not (_checks.all_finite(A) and _checks.all_finite(G)):
            raise ValueError(f"the K-FAC factors of {_name_of(self.factored, module)} are not finite (training "
                             f"diverged?): lower lr or kl_clip, or raise damping")
        state = self.state[module.weight]
        if "factor_A" in state and group["factor_decay"] > 0:
            decay = group["factor_decay"]
            A = decay * state["factor_A"] + (1 - decay) * A
            G = decay * state["factor_G"] + (1 - decay) * G
        state["factor_A"], state["factor_G"] = A, G
        damping = group["damping"]
        mean_A = A.diagonal().mean().clamp_min(1e-30)
        mean_G = G.diagonal().mean().clamp_min(1e-30)
        pi = (mean_A / mean_G).sqrt()
        root = math.sqrt(damping)
        state["inverse_A"] = _damped_inverse(A, pi * root, f"K-FAC factor A of {_name_of(self.factored, module)}")
        state["inverse_G"] = _damped_inverse(G, root / pi, f"K-FAC factor G of {_name_of(self.factored, module)}")

    def _warn_no_curvature(self) -> None:
        if not self._warned_no_curvature:
            warnings.warn("NaturalGradient.step() before any update_curvature(): the factored layers take plain "
                          "gradient steps until the first refresh", RuntimeWarning, stacklevel=3)
            self._warned_no_curvature = True


def _detach(output):
    return tuple(part.detach() for part in output) if isinstance(output, (tuple, list)) else output.detach()


def _parts(output) -> Tuple[torch.Tensor, ...]:
    return tuple(output) if isinstance(output, (tuple, list)) else (output,)


def _leading(output) -> int:
    return _parts(output)[0].shape[0]


def _connection_covector(kind: str, centre, plus, minus, alpha: float, sigma: Optional[float] = None):
    """The output-space covector w with Gamma^(alpha)(delta, delta) = F^-1 E_x[J^T w] (MATH.md section 6), from the
    outputs at theta (centre) and theta +- delta: r = f(+) + f(-) - 2 f ~ D^2 f[delta, delta], u = (f(+) - f(-)) / 2
    ~ J delta (errors O(|delta|^4) and O(|delta|^3)). w = F_f r + E[(u^T Hess l u) grad l]
    + (1 - alpha) / 2 E[(u . grad l)^2 grad l], l = log p(t | f), in closed form per output distribution."""
    third = 0.5 * (1.0 - alpha)
    if kind == "bernoulli":
        r, u = plus + minus - 2 * centre, 0.5 * (plus - minus)
        p = torch.sigmoid(centre)
        variance = p * (1 - p)
        return variance * r + third * variance * (1 - 2 * p) * u.square()
    if kind == "gaussian" and not isinstance(centre, (tuple, list)):
        scale = 1.0 if sigma is None else float(sigma)
        return (plus + minus - 2 * centre) / scale ** 2
    (m0, s0), (m1, s1), (m2, s2) = centre, plus, minus
    r_m, r_s = m1 + m2 - 2 * m0, s1 + s2 - 2 * s0
    u_m, u_s = 0.5 * (m1 - m2), 0.5 * (s1 - s2)
    if kind == "gaussian":  # (mean, std)
        inverse = 1.0 / s0
        w_m = r_m * inverse ** 2 + (-4.0 + 4.0 * third) * u_m * u_s * inverse ** 3
        w_s = 2.0 * r_s * inverse ** 2 + (-6.0 * u_s.square() + 2.0 * third * (u_m.square() + 4.0 * u_s.square())) \
            * inverse ** 3
        return w_m, w_s
    if kind == "posterior":  # (mu, logvar)
        precision = (-s0).exp()
        w_m = (r_m + (-2.0 + 2.0 * third) * u_m * u_s) * precision
        w_s = 0.5 * (r_s - u_s.square()) + third * (u_m.square() * precision + u_s.square())
        return w_m, w_s
    raise ValueError(f"kind must be one of {OUTPUT_KINDS}, got {kind!r}")


def _factorable(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros" \
        and not isinstance(module.padding, str)


def _module_parameters(module: nn.Module) -> List[torch.Tensor]:
    return [module.weight] + ([module.bias] if module.bias is not None else [])


def _name_of(factored: Dict[str, nn.Module], module: nn.Module) -> str:
    return next((name for name, m in factored.items() if m is module), type(module).__name__)


def _gradient(p: torch.Tensor, weight_decay: float) -> torch.Tensor:
    grad = p.grad if p.grad is not None else torch.zeros_like(p)
    return grad + weight_decay * p if weight_decay else grad


def _input_rows(module: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows [R, in (+1 for the bias)]: Linear rows over every leading dim, Conv2d unfolded
    patches (one row per example and output position)."""
    if isinstance(module, nn.Conv2d):
        patches = F.unfold(a, module.kernel_size, dilation=module.dilation, padding=module.padding,
                           stride=module.stride)  # [B, C k k, T]
        rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    else:
        rows = a.reshape(-1, a.shape[-1])
    if module.bias is not None:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], 1)
    return rows


def _output_rows(module: nn.Module, g: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Conv2d):
        return g.flatten(2).transpose(1, 2).reshape(-1, g.shape[1])  # [B T, C_out]
    return g.reshape(-1, g.shape[-1])


def _as_matrix(module: nn.Module, gradients: List[torch.Tensor]) -> torch.Tensor:
    """[out, in (+1)]: the weight's gradient (a Conv2d kernel flattened like the unfolded patches) and the bias's."""
    weight = gradients[0].reshape(gradients[0].shape[0], -1)
    return torch.cat([weight, gradients[1].unsqueeze(1)], 1) if len(gradients) > 1 else weight


def _from_matrix(module: nn.Module, matrix: torch.Tensor) -> List[torch.Tensor]:
    if module.bias is not None:
        return [matrix[:, :-1].reshape(module.weight.shape), matrix[:, -1].reshape(module.bias.shape)]
    return [matrix.reshape(module.weight.shape)]


def _damped_inverse(factor: torch.Tensor, damping: torch.Tensor, name: str) -> torch.Tensor:
    damped = factor + damping * torch.eye(factor.shape[0], dtype=factor.dtype, device=factor.device)
    return torch.cholesky_inverse(_linalg.cholesky(damped, name))
