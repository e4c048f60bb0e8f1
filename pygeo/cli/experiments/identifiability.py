"""Experiment `identifiability`: are latent distances stable across retrainings of the same VAE?

Two claims are tested on MNIST. The Riemannian-geometry blog the project grew from: "the latent coordinates are not
identifiable ... what is identifiable is the geometry ... distances remain consistent regardless of coordinate system".
Syrota, Moreno-Munoz & Hauberg (2024, "Decoder ensembling for learned latent geometries"): the geodesic distances of a
single decoder are NOT stable across retrainings, and an ensemble of decoders (the expected metric) makes them stable.

Per latent dimension d and retraining seed r, the same fixed test digits are encoded and all their pairwise distances
are measured under four kinds of latent distance: Euclidean; the geodesic distance of the decoder's Fisher metric
(Bernoulli); the geodesic distance of the expected metric with the uncertainty term (an RBF std fitted around the
decoder's mean, pygeo.models.fit_uncertainty_decoder, PullbackMetric(form="expected")); and the geodesic distance of
an ensemble of M decoders (pygeo.metrics.EnsembleMetric, from VAE(n_decoders=M)). Two data-space references no latent
coordinate can shift: distances between the digits in the LeNet feature space (pygeo.evaluate.MNISTFeatures) and in
pixel space. Identifiability is measured scale-free: each model's distances are divided by its median pair distance,
then per pair the coefficient of variation across retrainings; the Spearman rank correlation between retrainings; and
the Spearman correlation with the references. Intervals: bootstrap over the test digits (pairs are resampled through
their end points, so that the dependence of pairs sharing a digit is kept).

Resuming: the trained models, the fitted uncertainty decoders and the distance matrices are kept under
<parent of --out>/.identifiability-checkpoints/<key>/ (geodesic_distances(checkpoint=...) folders included), so a run
interrupted by Ctrl-C restarts where it stopped; the folder is left in place after a finished run (a rerun with the same
settings and data then only redraws the report).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import math
import signal
import threading
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ... import evaluate
from ..._files import atomic_write
from ...geometry import geodesic_distances
from ...metrics import PullbackMetric
from ...models import VAE, fit_uncertainty_decoder, train_vae
from ...models.uncertainty import RBFVariance, UncertaintyDecoder
from .common import ExperimentContext, format_interval

TITLE = "Identifiability of latent distances across retrained VAEs: Euclidean, geodesic, expected and ensemble metrics"
DESCRIPTION = ("pairwise distances of fixed test digits across retrained VAEs (d = 2 and 8): Euclidean vs Fisher "
               "geodesic vs expected-metric geodesic vs decoder-ensemble geodesic, against feature and pixel space")

KINDS = ("euclidean", "fisher", "expected", "ensemble")
KIND_NAMES = {"euclidean": "Euclidean latent", "fisher": "Fisher geodesic (1 decoder)",
              "expected": "expected metric + uncertainty", "ensemble": "ensemble geodesic (M decoders)"}
REFERENCES = ("features", "pixels")
REFERENCE_NAMES = {"features": "LeNet feature space", "pixels": "pixel space"}
CHECKPOINT_FOLDER = ".identifiability-checkpoints"
_FORMAT = 1  # bump when a change alters what the cached models or distances hold


@dataclass(frozen=True)
class Settings:
    n_train: int  # training images (the same for every retraining)
    epochs: int  # the single-decoder VAE's
    ensemble_epochs: int  # the ensemble VAE's: each mini-batch trains one of its M decoders, so more epochs
    batch_size: int
    lr: float
    hidden: Tuple[int, ...]
    n_decoders: int  # M, the ensemble's size
    latent_dims: Tuple[int, ...]
    per_class: Tuple[int, ...]  # test digits per class, per latent dimension (P = 10 x this)
    methods: Tuple[str, ...]  # geodesic_distances method per latent dimension
    n_points: int  # the energy solver's points per curve
    expected_max_iter: int  # its iteration cap for the expected metric (whose solves in d = 8 mostly do not converge)
    resolution: int  # the graph method's grid (d = 2)
    n_centers: int  # RBF centres of the uncertainty decoder
    fit_limit: int  # its std is fitted on the first fit_limit training digits
    fit_steps: int
    n_bootstrap: int
    classifier_epochs: int
    classifier_limit: Optional[int]


# Sized for a shared, heavily loaded 2-core CPU (about 30 minutes with 5 seeds): 6,000 training digits, 10 epochs
# (20 for the ensemble, whose decoders each see 1/M of the batches); the RBF std fitted on 2,000 of them; d = 2 by a
# 64 x 64 grid graph (its cost grows with the grid, not the pairs), d = 8 by the energy solver on 50 digits
# (1,225 pairs), at most expected_max_iter Gauss-Newton iterations for the expected metric (its d = 8 solves mostly do
# not converge in 300 and cost over 10 minutes per retraining: their best lengths, upper bounds, are used and counted).
FULL = Settings(n_train=6000, epochs=10, ensemble_epochs=20, batch_size=128, lr=1e-3, hidden=(128, 32), n_decoders=8,
                latent_dims=(2, 8), per_class=(10, 5), methods=("graph", "energy"), n_points=7, expected_max_iter=25,
                resolution=64, n_centers=64, fit_limit=2000, fit_steps=60, n_bootstrap=1000, classifier_epochs=4,
                classifier_limit=None)
QUICK = Settings(n_train=1000, epochs=2, ensemble_epochs=3, batch_size=128, lr=2e-3, hidden=(64, 16), n_decoders=3,
                 latent_dims=(2, 8), per_class=(2, 1), methods=("graph", "energy"), n_points=7, expected_max_iter=10,
                 resolution=40, n_centers=16, fit_limit=500, fit_steps=20, n_bootstrap=200, classifier_epochs=1,
                 classifier_limit=2000)


@dataclass
class Retraining:
    """One retraining's distances: kind -> [P, P] float64 (symmetric, zero diagonal)."""

    seed: int
    distances: Dict[str, np.ndarray]
    unconverged: Dict[str, int]  # geodesic solves that did not converge (their best lengths are used)
    elbo: Dict[str, float]  # "single", "ensemble": mean test ELBO (nats) of the test digits


@dataclass
class Summary:
    """Identifiability measures of one latent dimension, each (estimate, low, high) with a 95 % bootstrap interval."""

    latent_dim: int
    n_digits: int
    median_cv: Dict[str, Tuple[float, float, float]]
    retrain_spearman: Dict[str, Tuple[float, float, float]]  # mean over pairs of retrainings
    retrain_spearman_min: Dict[str, float]  # the worst pair of retrainings
    reference_spearman: Dict[Tuple[str, str], Tuple[float, float, float]]  # (kind, reference), mean over retrainings
    cv_difference: Dict[Tuple[str, str], Tuple[float, float, float]]  # median CV of a minus that of b, paired
    unconverged: Dict[str, int]
    n_pairs: int
    elbo: Dict[str, List[float]]  # "single", "ensemble": per retraining, mean test ELBO of the test digits


def run(ctx: ExperimentContext) -> str:
    settings = QUICK if ctx.quick else FULL
    train_images, _, train_source = ctx.load_data("train", limit=settings.n_train)
    # without --data-dir, load_data's "test" split is the held-out part of the 5,000 shipped digits
    test_images, test_labels, test_source = ctx.load_data("test")
    train_images = train_images.to(ctx.device)
    features = evaluate.MNISTFeatures(ctx.data_dir, seed=0, epochs=settings.classifier_epochs,
                                      train_limit=settings.classifier_limit, progress=ctx.show_progress)
    store = _store(ctx, settings, train_images, test_images)

    results: Dict[int, Tuple[List[Retraining], Dict[str, np.ndarray]]] = {}
    for d, per_class, method in zip(settings.latent_dims, settings.per_class, settings.methods):
        digits = _test_digits(test_labels, per_class)
        images = test_images[digits]
        with torch.no_grad():
            references = {"features": _pairwise(features.features(images).double()),
                          "pixels": _pairwise(images.double())}
        retrainings = [_retraining(ctx, settings, d, method, seed, train_images, images.to(ctx.device), store)
                       for seed in ctx.progress(ctx.seeds, desc=f"identifiability d={d} (retrainings)")]
        results[d] = (retrainings, references)
    summaries = [_summarise(d, *results[d], settings.n_bootstrap, seed=0) for d in settings.latent_dims]
    figures = [_figure_scatter(ctx, results, settings), _figure_cv(ctx, summaries)]
    return _report(summaries, settings, figures, train_source, test_source, features, store, ctx)


# ------------------------------------------------------------------------------------------------ data and models
def _test_digits(labels: torch.Tensor, per_class: int) -> torch.Tensor:
    """Indices of the first `per_class` test digits of each class 0..9, class by class -> [10 per_class]."""
    chosen = []
    for digit in range(10):
        indices = (labels == digit).nonzero().squeeze(-1)[:per_class]
        if len(indices) < per_class:
            raise ValueError(f"the test split has only {len(indices)} digits of class {digit}, need {per_class}")
        chosen.append(indices)
    return torch.cat(chosen)


def _pairwise(points: torch.Tensor) -> np.ndarray:
    """Euclidean distances between the rows of points [P, n] -> [P, P] float64."""
    points = points.detach().double().cpu()
    return torch.cdist(points, points).fill_diagonal_(0).numpy()


def _store(ctx: ExperimentContext, settings: Settings, train_images: torch.Tensor, test_images: torch.Tensor) -> Path:
    """The checkpoint folder of these settings and data: <parent of --out>/.identifiability-checkpoints/<key>."""
    digest = hashlib.sha256(json.dumps([_FORMAT, asdict(settings), str(ctx.device)], sort_keys=True).encode())
    for tensor in (train_images, test_images):
        digest.update(tensor.detach().cpu().numpy().tobytes())
    return ctx.out_dir.parent / CHECKPOINT_FOLDER / digest.hexdigest()[:16]


@contextlib.contextmanager
def _interrupts() -> Iterator[List[bool]]:
    """Records a Ctrl-C (SIGINT) in the yielded flag while still raising it: train_vae and fit_uncertainty_decoder
    catch KeyboardInterrupt and keep the model so far, which this experiment must not cache as finished."""
    flag = [False]
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        flag[0] = True
        if callable(previous):
            previous(signum, frame)
        else:
            raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def _save(path: Path, content) -> None:
    buffer = io.BytesIO()
    torch.save(content, buffer)
    atomic_write(path, lambda handle: handle.write(buffer.getvalue()))


def _train(settings: Settings, d: int, seed: int, n_decoders: int, epochs: int, train_images: torch.Tensor,
           path: Path, progress: bool) -> VAE:
    """The VAE of (d, seed) with n_decoders decoders, loaded from `path` when a finished one is cached there."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # initial weights
        vae = VAE(train_images.shape[1], d, hidden=settings.hidden, n_decoders=n_decoders).to(train_images.device)
    if path.is_file():
        vae.load_state_dict(torch.load(path, map_location=train_images.device, weights_only=True))
        return vae.eval()
    with _interrupts() as interrupted:
        train_vae(vae, train_images, epochs=epochs, batch_size=settings.batch_size, lr=settings.lr,
                  seed=seed, progress=progress)
    if interrupted[0]:
        raise KeyboardInterrupt(f"training of the d={d}, seed {seed} VAE interrupted (nothing cached for it)")
    _save(path, vae.state_dict())
    return vae.eval()


def _uncertainty_decoder(vae: VAE, settings: Settings, seed: int, train_images: torch.Tensor, path: Path,
                         progress: bool) -> UncertaintyDecoder:
    """The decoder's mean sigmoid(logits) with an RBF std fitted around the encoded training digits (as the demo's
    geodesic section), loaded from `path` when cached (the fit is cheap, but the distance checkpoint needs the
    same tensors bitwise)."""
    mean = nn.Sequential(*vae.decoder, nn.Sigmoid())  # an MLP still, so the fused paths apply
    train_images = train_images[:settings.fit_limit]
    latents = vae.encode_means(train_images)
    n_centers = min(settings.n_centers, len(latents))
    if path.is_file():
        variance = RBFVariance(torch.zeros(n_centers, vae.latent_dim), torch.ones(n_centers), train_images.shape[1])
        variance.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return UncertaintyDecoder(mean, variance.to(train_images.device))
    with _interrupts() as interrupted:
        decoder, _ = fit_uncertainty_decoder(mean, latents, train_images, n_centers=n_centers,
                                             steps=settings.fit_steps, lr=0.2, seed=seed, progress=progress)
    if interrupted[0]:
        raise KeyboardInterrupt(f"the uncertainty fit of the d={vae.latent_dim}, seed {seed} VAE was interrupted")
    _save(path, decoder.variance.state_dict())
    return decoder


def _retraining(ctx: ExperimentContext, settings: Settings, d: int, method: str, seed: int,
                train_images: torch.Tensor, images: torch.Tensor, store: Path) -> Retraining:
    """Trains (or loads) the single-decoder and the ensemble VAE of (d, seed) and measures every kind's distances
    between the test digits `images` [P, 784]."""
    prefix = store / f"d{d}-seed{seed}"
    done = prefix.with_name(prefix.name + "-distances.pt")
    if done.is_file():
        saved = torch.load(done, weights_only=False)
        return Retraining(seed, {k: np.asarray(v) for k, v in saved["distances"].items()}, saved["unconverged"],
                          saved["elbo"])
    show = ctx.show_progress
    single = _train(settings, d, seed, 1, settings.epochs, train_images, prefix.with_name(prefix.name + "-single.pt"),
                    show)
    ensemble = _train(settings, d, seed, settings.n_decoders, settings.ensemble_epochs, train_images,
                      prefix.with_name(prefix.name + "-ensemble.pt"), show)
    elbo = {"single": _test_elbo(single, images, seed), "ensemble": _test_elbo(ensemble, images, seed)}
    uncertain = _uncertainty_decoder(single, settings, seed, train_images,
                                     prefix.with_name(prefix.name + "-variance.pt"), show)
    z_single, z_ensemble = single.encode_means(images), ensemble.encode_means(images)
    metrics = {"fisher": (PullbackMetric(single.decoder, likelihood="bernoulli"), z_single),
               "expected": (PullbackMetric(uncertain, likelihood="gaussian", form="expected"), z_single),
               "ensemble": (ensemble.metric(likelihood="bernoulli"), z_ensemble)}
    distances = {"euclidean": _pairwise(z_single)}
    unconverged = {"euclidean": 0}
    for kind, (metric, z) in metrics.items():
        options = dict(method=method, progress=show)
        if method == "energy":
            options.update(n_points=settings.n_points, checkpoint=prefix.with_name(f"{prefix.name}-{kind}"))
            if kind == "expected":
                options.update(max_iter=settings.expected_max_iter)
        else:
            options.update(resolution=settings.resolution)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            matrix = geodesic_distances(metric, z, **options)
        unconverged[kind] = _count_unconverged(caught)
        for warning in caught:
            if "did not converge" not in str(warning.message):
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        if torch.isnan(matrix).any():  # geodesic_distances returns NaN for the pairs a Ctrl-C left unsolved
            raise KeyboardInterrupt(f"geodesic distances ({kind}, d={d}, seed {seed}) interrupted; finished blocks "
                                    f"are kept under {store}")
        distances[kind] = matrix.detach().double().cpu().numpy()
    _save(done, {"distances": {k: torch.from_numpy(v) for k, v in distances.items()}, "unconverged": unconverged,
                 "elbo": elbo})
    return Retraining(seed, distances, unconverged, elbo)


def _test_elbo(vae: VAE, images: torch.Tensor, seed: int) -> float:
    """Mean single-sample ELBO (nats) of the test digits (for an ensemble: its members' log-likelihoods averaged)."""
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return float(vae.elbo(images).mean())


def _count_unconverged(caught) -> int:
    """The count geodesic_distances' 'N of M geodesic solves did not converge' warning reports (0 without one)."""
    for warning in caught:
        text = str(warning.message)
        if "did not converge" in text:
            return int(text.split("geodesic_distances: ", 1)[-1].split(" of ", 1)[0])
    return 0


# ------------------------------------------------------------------------------------------------ measures
def _normalised(distances: np.ndarray) -> np.ndarray:
    """A model's distances [P, P] divided by its median pair distance (scale-free across retrainings)."""
    rows, cols = np.triu_indices(len(distances), 1)
    median = float(np.median(distances[rows, cols]))
    if not median > 0:
        raise ValueError(f"the median pair distance must be positive to normalise by it, got {median}")
    return distances / median


def pair_cv(stack: np.ndarray) -> np.ndarray:
    """Coefficient of variation across retrainings of normalised distances stack [R, P, P] -> [P, P] (sample
    standard deviation, ddof 1, over the mean; the diagonal is 0)."""
    if stack.shape[0] < 2:
        raise ValueError(f"the coefficient of variation needs at least 2 retrainings, got {stack.shape[0]}")
    mean = stack.mean(0)
    cv = np.zeros_like(mean)
    off = ~np.eye(stack.shape[1], dtype=bool)
    cv[off] = stack.std(0, ddof=1)[off] / mean[off]
    return cv


def _ranks(values: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return rankdata(values, axis=-1)


def _spearman_rows(ranked: np.ndarray) -> np.ndarray:
    """Spearman correlations between all rows of already-ranked values [K, n] -> [K, K] (Pearson of the ranks)."""
    centred = ranked - ranked.mean(-1, keepdims=True)
    norms = np.sqrt((centred ** 2).sum(-1))
    return (centred @ centred.T) / np.outer(norms, norms)


def _statistics(stacks: Dict[str, np.ndarray], cvs: Dict[str, np.ndarray], references: Dict[str, np.ndarray],
                rows: np.ndarray, cols: np.ndarray) -> Dict[str, float]:
    """Every measure on the pairs (rows[i], cols[i]): 'cv|kind', 'retrain|kind', 'retrain_min|kind', 'ref|kind|ref'."""
    out: Dict[str, float] = {}
    reference_ranks = {name: _ranks(matrix[rows, cols]) for name, matrix in references.items()}
    for kind, stack in stacks.items():
        out[f"cv|{kind}"] = float(np.median(cvs[kind][rows, cols]))
        ranked = _ranks(stack[:, rows, cols])  # [R, n]
        correlations = _spearman_rows(np.concatenate([ranked, np.stack(list(reference_ranks.values()))]))
        R = stack.shape[0]
        upper = correlations[:R, :R][np.triu_indices(R, 1)]
        out[f"retrain|{kind}"] = float(upper.mean())
        out[f"retrain_min|{kind}"] = float(upper.min())
        for index, name in enumerate(reference_ranks):
            out[f"ref|{kind}|{name}"] = float(correlations[:R, R + index].mean())
    return out


def _summarise(d: int, retrainings: Sequence[Retraining], references: Dict[str, np.ndarray], n_bootstrap: int,
               seed: int) -> Summary:
    """The measures of one latent dimension with 95 % percentile intervals from n_bootstrap resamples of the test
    digits (a resample keeps the pairs of two distinct drawn digits)."""
    stacks = {kind: np.stack([_normalised(r.distances[kind]) for r in retrainings]) for kind in KINDS}
    cvs = {kind: pair_cv(stack) for kind, stack in stacks.items()}
    P = next(iter(references.values())).shape[0]
    rows, cols = np.triu_indices(P, 1)
    estimate = _statistics(stacks, cvs, references, rows, cols)
    generator = np.random.default_rng(seed)
    draws: Dict[str, List[float]] = {key: [] for key in estimate}
    for _ in range(n_bootstrap):
        digits = generator.integers(P, size=P)
        keep = digits[rows] != digits[cols]
        for key, value in _statistics(stacks, cvs, references, digits[rows][keep], digits[cols][keep]).items():
            draws[key].append(value)

    def interval(key):
        low, high = np.percentile(draws[key], [2.5, 97.5])
        return estimate[key], float(low), float(high)

    differences = {}
    for a, b in (("euclidean", "fisher"), ("fisher", "ensemble"), ("euclidean", "ensemble"), ("fisher", "expected")):
        paired = np.array(draws[f"cv|{a}"]) - np.array(draws[f"cv|{b}"])
        low, high = np.percentile(paired, [2.5, 97.5])
        differences[(a, b)] = (estimate[f"cv|{a}"] - estimate[f"cv|{b}"], float(low), float(high))
    return Summary(latent_dim=d, n_digits=P, median_cv={k: interval(f"cv|{k}") for k in KINDS},
                   retrain_spearman={k: interval(f"retrain|{k}") for k in KINDS},
                   retrain_spearman_min={k: estimate[f"retrain_min|{k}"] for k in KINDS},
                   reference_spearman={(k, ref): interval(f"ref|{k}|{ref}") for k in KINDS for ref in REFERENCES},
                   cv_difference=differences,
                   unconverged={k: sum(r.unconverged.get(k, 0) for r in retrainings) for k in KINDS},
                   n_pairs=len(rows), elbo={key: [r.elbo[key] for r in retrainings] for key in ("single", "ensemble")})


# ------------------------------------------------------------------------------------------------ figures
def _figure_scatter(ctx, results, settings) -> str:
    from matplotlib.figure import Figure

    dims = settings.latent_dims
    figure = Figure(figsize=(13.0, 3.6 * len(dims) + 0.6), layout="constrained")
    grid = figure.subplots(len(dims), len(KINDS), squeeze=False)
    for row, d in enumerate(dims):
        retrainings, _ = results[d]
        first, second = retrainings[0], retrainings[1]
        pairs = [(_normalised(first.distances[k]), _normalised(second.distances[k])) for k in KINDS]
        iu = np.triu_indices(len(pairs[0][0]), 1)
        top = max(float(max(a[iu].max(), b[iu].max())) for a, b in pairs) * 1.05
        for column, (kind, (a, b)) in enumerate(zip(KINDS, pairs)):
            axes = grid[row][column]
            axes.scatter(a[iu], b[iu], s=4, alpha=0.35, color=f"C{column}", linewidths=0)
            axes.plot([0, top], [0, top], color="black", linewidth=0.8, linestyle="--")
            axes.set_xlim(0, top)
            axes.set_ylim(0, top)
            axes.set_aspect("equal")
            rho = float(_spearman_rows(_ranks(np.stack([a[iu], b[iu]])))[0, 1])
            axes.set_title(f"d={d}: {KIND_NAMES[kind]}\nSpearman {rho:.3f}", fontsize=9)
            axes.set_xlabel(f"seed {first.seed}: distance / median", fontsize=8)
            if column == 0:
                axes.set_ylabel(f"seed {second.seed}: distance / median", fontsize=8)
            axes.tick_params(labelsize=7)
    figure.suptitle("Pair distances of two retrainings against each other (each divided by its model's median pair "
                    "distance; dashed: equal)", fontsize=10)
    return ctx.save_figure(figure, "identifiability_scatter.png")


def _figure_cv(ctx, summaries: Sequence[Summary]) -> str:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8.0, 4.4))
    axes = figure.add_subplot()
    width = 0.8 / len(summaries)
    positions = np.arange(len(KINDS))
    for index, summary in enumerate(summaries):
        values = np.array([summary.median_cv[k] for k in KINDS])
        errors = np.stack([values[:, 0] - values[:, 1], values[:, 2] - values[:, 0]])
        axes.bar(positions + (index - (len(summaries) - 1) / 2) * width, values[:, 0], width, yerr=errors,
                 capsize=4, label=f"d = {summary.latent_dim} ({summary.n_digits} digits, {summary.n_pairs} pairs)")
    axes.set_xticks(positions, [KIND_NAMES[k] for k in KINDS], fontsize=8, rotation=12)
    axes.set_ylabel("median over pairs of the CV across retrainings")
    axes.set_title("Spread of normalised pair distances across retrainings\n(95% bootstrap interval over test digits)",
                   fontsize=10)
    axes.legend(fontsize=8)
    return ctx.save_figure(figure, "identifiability_cv.png")


# ------------------------------------------------------------------------------------------------ report
def _fmt(value: Tuple[float, float, float], digits: int = 3) -> str:
    estimate, low, high = value
    return f"{estimate:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def _verdicts(summaries: Sequence[Summary]) -> List[str]:
    """One paragraph per claim, computed from the measures."""
    blog, syrota = [], []
    for s in summaries:
        gap = s.cv_difference[("euclidean", "fisher")]  # > 0: the geodesic distances spread less
        if gap[1] > 0:
            blog_result = "lower than"
        elif gap[2] < 0:
            blog_result = "higher than"
        else:
            blog_result = "not distinguishable from"
        blog.append(
            f"d = {s.latent_dim}: median CV of the single decoder's Fisher geodesic distances "
            f"{_fmt(s.median_cv['fisher'])} is {blog_result} the Euclidean one {_fmt(s.median_cv['euclidean'])} "
            f"(difference {_fmt(gap)}); Spearman between retrainings {_fmt(s.retrain_spearman['fisher'])} "
            f"against {_fmt(s.retrain_spearman['euclidean'])}; with the LeNet feature distances "
            f"{_fmt(s.reference_spearman[('fisher', 'features')])} against "
            f"{_fmt(s.reference_spearman[('euclidean', 'features')])}")
        gain = s.cv_difference[("fisher", "ensemble")]  # > 0: the ensemble spreads less
        if gain[1] > 0:
            syrota_result = "lower than"
        elif gain[2] < 0:
            syrota_result = "higher than"
        else:
            syrota_result = "not distinguishable from"
        syrota.append(
            f"d = {s.latent_dim}: median CV of the ensemble geodesic distances {_fmt(s.median_cv['ensemble'])} is "
            f"{syrota_result} the single decoder's {_fmt(s.median_cv['fisher'])} (difference {_fmt(gain)}); "
            f"Spearman between retrainings {_fmt(s.retrain_spearman['ensemble'])} against "
            f"{_fmt(s.retrain_spearman['fisher'])}")
    geodesic_better = [s.cv_difference[("euclidean", "fisher")][1] > 0 for s in summaries]
    ensemble_better = [s.cv_difference[("fisher", "ensemble")][1] > 0 for s in summaries]

    def word(flags):
        return "support" if all(flags) else ("partly support" if any(flags) else "do not support")

    dims = ", ".join(str(s.latent_dim) for s in summaries)
    reflects = "; ".join(
        f"d = {s.latent_dim}: ensemble {_fmt(s.reference_spearman[('ensemble', 'features')])} against single "
        f"decoder {_fmt(s.reference_spearman[('fisher', 'features')])} and Euclidean "
        f"{_fmt(s.reference_spearman[('euclidean', 'features')])}" for s in summaries)
    return [
        f"**The blog's claim** (\"what is identifiable is the geometry: distances remain consistent regardless of "
        f"coordinate system\"), read as: single-decoder geodesic distances vary less across retrainings than "
        f"Euclidean latent distances. The data {word(geodesic_better)} it (d = {dims}; the 95 % interval of the "
        f"paired difference of median CVs must exclude 0). " + "; ".join(blog) + ".",
        "",
        f"**Syrota et al.'s claim** (\"single-decoder geodesic distances are not stable across retrainings; an "
        f"ensemble of decoders makes them stable\"), read as: the ensemble's median CV is below the single "
        f"decoder's. The data {word(ensemble_better)} it (d = {dims}). " + "; ".join(syrota) + ".",
        "",
        "**Stable is not the same as meaningful**: the Spearman correlation of each kind's distances with the LeNet "
        "feature-space distances of the same digits (mean over retrainings): " + reflects + ". A distance that "
        "every retraining reproduces but that does not follow image similarity says little about the data.",
    ]


def _report(summaries, settings, figures, train_source, test_source, features, store, ctx) -> str:
    R = len(ctx.seeds)
    lines = [
        "## Claims",
        "",
    ] + _verdicts(summaries) + [
        "",
        "## Protocol",
        "",
        f"- Training data: the same {settings.n_train} images for every retraining, {train_source}. Test digits: "
        f"the first {', '.join(str(p) for p in settings.per_class)} of each class (d = "
        f"{', '.join(map(str, settings.latent_dims))}), {test_source}.",
        f"- Models: Bernoulli VAE 784-{'-'.join(map(str, settings.hidden))}-d (Softplus), standard normal prior, "
        f"Adam, {settings.epochs} epochs ({settings.ensemble_epochs} for the ensemble), batch {settings.batch_size}, "
        f"lr {settings.lr:g}. Per latent dimension and retraining seed ({R} retrainings: "
        f"{', '.join(map(str, ctx.seeds))}; the seed sets the initial weights and the batch order) two models are "
        f"trained: a single-decoder VAE, and a VAE with the same encoder architecture and M = {settings.n_decoders} "
        f"decoders (pygeo.models.VAE(n_decoders=M): one member drawn per mini-batch, Syrota et al.; so each member "
        f"sees 1/M of the batches, hence the ensemble's longer training). Mean test ELBO of the test digits (nats, "
        f"mean ± 95 % Student-t interval over retrainings): "
        + "; ".join(f"d = {s.latent_dim}: single {format_interval(s.elbo['single'], 1)}, ensemble "
                    f"{format_interval(s.elbo['ensemble'], 1)}" for s in summaries) + ".",
        "- Distances between all pairs of the test digits' encoder means: Euclidean latent and Fisher geodesic "
        "(PullbackMetric(decoder, likelihood=\"bernoulli\")) on the single-decoder VAE; the expected metric with "
        "the uncertainty term G = J_mu^T J_mu + J_sigma^T J_sigma (mean sigmoid(logits) of the same decoder, RBF "
        f"std over {settings.n_centers} k-means centres of the first {settings.fit_limit} encoded training digits, "
        f"fitted on them in {settings.fit_steps} Adam steps, pygeo.models.fit_uncertainty_decoder; "
        "PullbackMetric(form=\"expected\")); and the ensemble's expected Fisher metric G = (1/M) sum_m J_m^T F_m "
        "J_m (vae.metric(), pygeo.metrics.EnsembleMetric) on the ensemble VAE's own encoder means. Solver: "
        + "; ".join(f"d = {d}: pygeo.geodesic_distances(method=\"{m}\"" +
                    (f", resolution={settings.resolution}: shortest paths on a grid graph, a little long)"
                     if m == "graph" else f", n_points={settings.n_points}, checkpoint=...; at most "
                     f"{settings.expected_max_iter} Gauss-Newton iterations for the expected metric, whose "
                     "unconverged solves give their best curve's length, an upper bound, counted in the table)")
                    for d, m in zip(settings.latent_dims, settings.methods)) + ", float32.",
        f"- Data-space references: Euclidean distances of the digits in the penultimate layer of "
        f"pygeo.evaluate.MNISTFeatures (LeNet, {settings.classifier_epochs} epochs, test accuracy "
        f"{features.test_accuracy:.2%} on {features.test_size} digits) and in pixel space.",
        "- Measures: every model's distances divided by its median pair distance; per pair the coefficient of "
        "variation (sample std / mean) across the retrainings, and its median over pairs; the Spearman correlation "
        "of the pair distances between every two retrainings (mean over the R(R-1)/2 pairs of retrainings; the "
        "worst pair in the table too); and the Spearman correlation of each kind with each reference (mean over "
        f"retrainings). 95 % intervals: percentile bootstrap over the test digits ({settings.n_bootstrap} "
        "resamples; a resample draws P digits with replacement and keeps the pairs of two distinct draws, so the "
        "dependence between pairs that share a digit is kept), with the retrainings fixed; differences of median "
        "CVs are bootstrapped paired (the same resamples). Bracketed numbers are the intervals.",
        f"- Checkpoints: trained models, uncertainty decoders and distance matrices under `{CHECKPOINT_FOLDER}/"
        f"{store.name}/` beside the output folder; an interrupted run resumes from them.",
        "",
        "## Results",
        "",
        "| d | pairs | distance | median CV across retrainings | Spearman between retrainings (mean) | worst "
        "pair of retrainings | Spearman with LeNet features | Spearman with pixels | unconverged solves |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in summaries:
        for kind in KINDS:
            lines.append(
                f"| {s.latent_dim} | {s.n_pairs} | {KIND_NAMES[kind]} | {_fmt(s.median_cv[kind])} | "
                f"{_fmt(s.retrain_spearman[kind])} | {s.retrain_spearman_min[kind]:.3f} | "
                f"{_fmt(s.reference_spearman[(kind, 'features')])} | {_fmt(s.reference_spearman[(kind, 'pixels')])} "
                f"| {s.unconverged[kind] if kind != 'euclidean' else 'n/a'} |")
    lines += [
        "",
        "Paired differences of the median CV (a minus b; > 0: b varies less across retrainings):",
        "",
        "| d | a | b | difference [95 % interval] |",
        "|---:|---|---|---:|",
    ]
    for s in summaries:
        for (a, b), value in s.cv_difference.items():
            lines.append(f"| {s.latent_dim} | {KIND_NAMES[a]} | {KIND_NAMES[b]} | {_fmt(value)} |")
    lines += [
        "",
        "## Figures",
        "",
        figures[0],
        "",
        "Pair distances of the first two retrainings against each other, per kind, after dividing by each model's "
        "median pair distance (same axes within a row). Points on the dashed line are pairs whose distance the "
        "retraining did not change.",
        "",
        figures[1],
        "",
        "Median over pairs of the coefficient of variation across retrainings, with 95 % bootstrap intervals over "
        "the test digits.",
    ]
    return "\n".join(lines)
