"""Experiment: does natural-gradient training of a VAE converge 3-5x faster than Adam, and at which batch sizes?

The Riemannian information-geometry paper claims a natural-gradient algorithm for VAE training that "follows
geodesics on the Fisher information manifold" and converges 3-5x faster than Adam. Here the same VAE (pygeo's
Bernoulli VAE) is trained on MNIST by Adam, by pygeo.optim.NaturalGradient (K-FAC with the Fisher of the decoder's
likelihood and of the encoder's Gaussian posterior) and by the same K-FAC with the geodesic correction of Song, Song &
Ermon (2018), at several batch sizes. Per batch size, Adam's learning rate and K-FAC's KL clip are tuned on the first
seed over grids that should bracket the best; the chosen settings are repeated over the seeds; the report gives the
steps and the wall time each needs to reach two targets (tuned Adam's mean test ELBO after half its budget, and each
seed's Adam ELBO after the whole budget), their ratios with 95 % intervals, the speed-up against batch size and a
verdict per batch size.

Second, per-point latent refinement on the trained decoder (pygeo.optim.refine_latents): natural (Fisher / Gauss-Newton)
steps against gradient descent and Adam, steps and time until 90 % of the points are within 0.1 nats of the best
objective any method found; and the amortisation gap: the test ELBO with the encoder's posterior against the ELBO
with the refined means (encoder variances, and the Laplace covariance (G + I)^-1 that refine_latents returns).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.nn import functional as F

from ...models import VAE
from ...optim import NaturalGradient, refine_latents
from ..context import synchronize
from .common import ExperimentContext, format_interval, mean_interval

TITLE = "Natural gradient (K-FAC, geodesic correction, Fisher latent refinement) against Adam"
DESCRIPTION = ("the '3-5x faster than Adam' claim: K-FAC (with and without the geodesic correction) vs tuned Adam to "
               "fixed test ELBOs at batch sizes 128-2048, natural vs gradient vs Adam latent refinement, the "
               "amortisation gap")

# Within this many nats of the best objective found for a point, the point counts as refined.
REFINE_TOLERANCE = 0.1
# Fraction of points that must be refined for a method to have "reached" the objective.
REFINE_QUANTILE = 0.9
METHODS = ("adam", "natural", "geodesic")
NAMES = {"adam": "Adam", "natural": "K-FAC", "geodesic": "K-FAC + geodesic correction"}
COLOURS = {"adam": "tab:blue", "natural": "tab:red", "geodesic": "tab:purple"}


@dataclass(frozen=True)
class Settings:
    n_train: int
    n_test: int
    latent_dim: int
    hidden: Tuple[int, ...]
    batch_sizes: Tuple[int, ...]
    steps: Tuple[int, ...]  # training steps per run at each batch size (the budget)
    evaluations: int  # test evaluations per run (every steps // evaluations steps)
    adam_lrs: Tuple[float, ...]
    natural_lr: float
    natural_damping: float
    natural_kl_clips: Tuple[float, ...]  # K-FAC's tuned setting (with the clip on, lr only bounds the step)
    curvature_every: int
    refine_points: int
    natural_refine_steps: int
    other_refine_steps: int
    refine_adam_lrs: Tuple[float, ...]
    elbo_samples: int
    workers: int = 1  # batch sizes swept in parallel processes (one torch thread each)


FULL = Settings(n_train=10000, n_test=1000, latent_dim=8, hidden=(256, 64), batch_sizes=(128, 512, 2048),
                steps=(3000, 700, 250), evaluations=100, adam_lrs=(1e-3, 3e-3, 1e-2), natural_lr=0.3,
                natural_damping=0.1, natural_kl_clips=(3e-3, 1e-2, 3e-2), curvature_every=10,
                refine_points=256, natural_refine_steps=15, other_refine_steps=150, refine_adam_lrs=(0.03, 0.1),
                elbo_samples=16, workers=4)
QUICK = Settings(n_train=1500, n_test=300, latent_dim=8, hidden=(256, 64), batch_sizes=(64, 256), steps=(40, 20),
                 evaluations=4, adam_lrs=(1e-3, 3e-3), natural_lr=0.3, natural_damping=0.1, natural_kl_clips=(1e-2,),
                 curvature_every=10, refine_points=64, natural_refine_steps=6, other_refine_steps=30,
                 refine_adam_lrs=(0.03,), elbo_samples=4)


@dataclass
class TrainingRun:
    """One training run: test ELBO after steps[i] steps and seconds[i] of training (evaluation time excluded)."""
    method: str
    config: Dict[str, float]
    seed: int
    steps: List[int]
    seconds: List[float]
    elbo: List[float]
    model: VAE

    @property
    def final(self) -> float:
        return self.elbo[-1] if math.isfinite(self.elbo[-1]) else -math.inf

    def reach(self, target: float) -> Tuple[Optional[int], Optional[float]]:
        """(steps, seconds) at the first evaluation whose test ELBO is >= target, or (None, None)."""
        for steps, seconds, elbo in zip(self.steps, self.seconds, self.elbo):
            if elbo >= target:
                return steps, seconds
        return None, None


@dataclass
class BatchResult:
    """Everything measured at one batch size."""
    batch_size: int
    steps: int
    tuning: List[TrainingRun]
    best: Dict[str, TrainingRun]
    runs: Dict[str, List[TrainingRun]]  # method -> one run per seed
    half: int  # the evaluated step at (or before) half the budget
    target: float  # tuned Adam's mean test ELBO there


def run(ctx: ExperimentContext) -> str:
    settings = QUICK if ctx.quick else FULL
    train_images, _, train_source = ctx.load_data("train", limit=settings.n_train)
    test_images, _, test_source = ctx.load_data("test", limit=settings.n_test)
    train_images, test_images = train_images.to(ctx.device), test_images.to(ctx.device)
    lines = [f"Training data: {len(train_images)} images from {train_source}; test data: {len(test_images)} images "
             f"from {test_source}.", ""]
    results = sweep(ctx, settings, train_images, test_images)
    lines += summary_section(settings, results)
    lines.append(ctx.save_figure(speedup_figure(results), "speedup_vs_batch.png"))
    lines.append("")
    for result in results:
        lines += batch_section(settings, result)
    lines.append(ctx.save_figure(training_figure(results), "elbo_vs_time.png"))
    lines.append("")

    # ---- latent refinement and the amortisation gap, on each seed's tuned-Adam model of the first batch size
    refinement = [refine_comparison(ctx, settings, run.model, test_images[:settings.refine_points], run.seed)
                  for run in ctx.progress(results[0].runs["adam"], desc="latent refinement")]
    lines += refinement_section(settings, refinement, results[0].batch_size)
    lines.append(ctx.save_figure(refinement_figure(refinement[0]), "refinement.png"))
    lines.append("")
    lines += deviations(settings, ctx)
    return "\n".join(lines)


def sweep(ctx: ExperimentContext, settings: Settings, train_images: torch.Tensor,
          test_images: torch.Tensor) -> List[BatchResult]:
    """Every batch size's runs, in up to settings.workers processes (spawned, one torch thread each).

    Per batch size, in order: Adam's grid on the first seed (full budget, chosen by the final test ELBO); tuned Adam
    on the other seeds, which fixes both targets; K-FAC's grid on the first seed; K-FAC on the other seeds and K-FAC
    with the geodesic correction on every seed. Each K-FAC run stops once it has reached both of its seed's targets
    (the rest of its budget cannot change a time to a target); K-FAC's setting is chosen by the fewest steps to the
    first seed's target 2 (the final ELBO when no setting reaches it). Independent runs (of every batch size) share
    the pool; every run is timed alone in its process, so the load of a shared machine hits the methods alike."""
    plans = [_BatchPlan(settings, batch_size, steps, ctx.seeds)
             for batch_size, steps in zip(settings.batch_sizes, settings.steps)]
    workers = settings.workers if ctx.device.type == "cpu" else 1
    if workers <= 1:
        for plan in plans:
            while not plan.finished:
                plan.record([_run_job(ctx, settings, job, train_images, test_images) for job in plan.next_jobs()])
        return [plan.result() for plan in plans]
    import dataclasses
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    from tqdm.auto import tqdm

    quiet = dataclasses.replace(ctx, show_progress=False)  # one bar over the runs, none per run in the workers

    pending: Dict[object, Tuple[_BatchPlan, int]] = {}
    outcomes: Dict[int, Dict[int, TrainingRun]] = {}
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        def submit(plan: _BatchPlan) -> None:
            jobs = plan.next_jobs()
            while not jobs and not plan.finished:  # a stage without runs (a single seed)
                plan.record([])
                jobs = plan.next_jobs()
            outcomes[id(plan)] = {}
            plan.waiting = len(jobs)
            for index, job in enumerate(jobs):
                future = pool.submit(_train_worker, quiet, settings, job, train_images, test_images)
                pending[future] = (plan, index)

        for plan in plans:
            submit(plan)
        with tqdm(total=sum(plan.total_runs for plan in plans), desc="training runs",
                  disable=not ctx.show_progress) as bar:
            while pending:
                done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
                for future in done:
                    plan, index = pending.pop(future)
                    outcomes[id(plan)][index] = future.result()
                    bar.update(1)
                    plan.waiting -= 1
                    if plan.waiting == 0:
                        batch = outcomes[id(plan)]
                        plan.record([batch[i] for i in range(len(batch))])
                        if not plan.finished:
                            submit(plan)
    return [plan.result() for plan in plans]


def _train_worker(ctx: ExperimentContext, settings: Settings, job: tuple, train_images: torch.Tensor,
                  test_images: torch.Tensor) -> TrainingRun:
    torch.set_num_threads(1)
    return _run_job(ctx, settings, job, train_images, test_images)


def _run_job(ctx: ExperimentContext, settings: Settings, job: tuple, train_images: torch.Tensor,
             test_images: torch.Tensor) -> TrainingRun:
    """job = (method, config, seed, batch size, step budget[, stop_at])."""
    method, config, seed, batch_size, budget, *stop = job
    return train(ctx, settings, method, config, seed, batch_size, budget, train_images, test_images,
                 stop_at=stop[0] if stop else None)


class _BatchPlan:
    """The stages of one batch size's runs: next_jobs() gives the runs that can start now, record() takes their
    results (in the same order), result() the BatchResult when no jobs are left."""

    def __init__(self, settings: Settings, batch_size: int, steps: int, seeds: Sequence[int]):
        self.settings, self.batch_size, self.steps, self.seeds = settings, batch_size, steps, list(seeds)
        self.stage = 0
        self.waiting = 0
        self.tuning: List[TrainingRun] = []
        self.best: Dict[str, TrainingRun] = {}
        self.runs: Dict[str, List[TrainingRun]] = {method: [] for method in METHODS}
        self.stop: Dict[int, float] = {}
        self.total_runs = (len(settings.adam_lrs) + len(settings.natural_kl_clips) + 3 * len(self.seeds) - 2)
        self._queued: List[Tuple[str, int]] = []

    def next_jobs(self) -> List[tuple]:
        s, first, b = self.settings, self.seeds[0], self.batch_size
        if self.stage == 0:
            return [("adam", dict(lr=lr), first, b, self.steps) for lr in s.adam_lrs]
        if self.stage == 1:
            return [("adam", self.best["adam"].config, seed, b, self.steps) for seed in self.seeds[1:]]
        if self.stage == 2:
            return [("natural", dict(lr=s.natural_lr, damping=s.natural_damping, kl_clip=clip), first, b,
                     self.steps, self.stop[first]) for clip in s.natural_kl_clips]
        if self.stage == 3:
            self._queued = [("natural", seed) for seed in self.seeds[1:]] + [("geodesic", seed) for seed in self.seeds]
            return [(method, self.best["natural"].config, seed, b, self.steps, self.stop[seed])
                    for method, seed in self._queued]
        return []

    def record(self, runs: List[TrainingRun]) -> None:
        first = self.seeds[0]
        if self.stage == 0:
            self.tuning += runs
            self.best["adam"] = max(runs, key=lambda r: r.final)
            self.runs["adam"].append(self.best["adam"])
        elif self.stage == 1:
            self.runs["adam"] += runs
            self.half = max(step for step in self.runs["adam"][0].steps if step <= self.steps // 2)
            self.target = sum(r.elbo[r.steps.index(self.half)] for r in self.runs["adam"]) / len(self.runs["adam"])
            self.stop = {adam.seed: max(self.target, adam.final) for adam in self.runs["adam"]}
        elif self.stage == 2:
            self.tuning += runs
            first_adam = self.runs["adam"][0]

            def speed(run: TrainingRun) -> Tuple[float, float]:
                reached, _ = run.reach(first_adam.final)
                return (-reached if reached is not None else -math.inf, run.final)
            self.best["natural"] = max(runs, key=speed)
            self.best["geodesic"] = self.best["natural"]  # the correction runs with K-FAC's tuned setting
            self.runs["natural"].append(self.best["natural"])
        elif self.stage == 3:
            for (method, _), run in zip(self._queued, runs):
                self.runs[method].append(run)
        self.stage += 1

    @property
    def finished(self) -> bool:
        return self.stage > 3

    def result(self) -> BatchResult:
        return BatchResult(self.batch_size, self.steps, self.tuning, self.best, self.runs, self.half, self.target)


# ------------------------------------------------------------------------------------------------------- training
def train(ctx: ExperimentContext, settings: Settings, method: str, config: Dict[str, float], seed: int,
          batch_size: int, budget: int, images: torch.Tensor, test_images: torch.Tensor,
          stop_at: Optional[float] = None) -> TrainingRun:
    """`budget` steps of Adam or NaturalGradient (method "natural", or "geodesic" with the geodesic correction) on
    mini-batches of `batch_size`, the test ELBO `settings.evaluations` times; stopped early at the first evaluation
    at or above `stop_at` (None: the whole budget).

    Its own loop rather than pygeo.models.train_vae: the curve needs test evaluations between steps, kept out of the
    timed training time. Deterministic per seed (the model's initialisation, the batch order and the sampling noise)."""
    if batch_size > len(images):
        raise ValueError(f"batch_size {batch_size} is larger than the {len(images)} training images")
    eval_every = max(1, budget // settings.evaluations)
    with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []):
        torch.manual_seed(seed)
        model = VAE(data_dim=images.shape[1], latent_dim=settings.latent_dim, hidden=settings.hidden).to(ctx.device)
        if method == "adam":
            optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"])
        else:
            optimizer = NaturalGradient(model, lr=config["lr"], damping=config["damping"], kl_clip=config["kl_clip"],
                                        curvature_every=settings.curvature_every,
                                        geodesic_correction=method == "geodesic")
        order_generator = torch.Generator().manual_seed(seed)
        steps, seconds, elbo = [0], [0.0], [test_elbo(model, test_images)]
        order, position, elapsed = torch.randperm(len(images), generator=order_generator), 0, 0.0
        label = f"b{batch_size} {method} " + ", ".join(f"{key}={value:g}" for key, value in config.items()) + \
            f", seed {seed}"
        model.train()
        for step in ctx.progress(range(1, budget + 1), desc=label):
            if position + batch_size > len(images):
                order, position = torch.randperm(len(images), generator=order_generator), 0
            batch = images[order[position:position + batch_size].to(images.device)]
            position += batch_size
            synchronize(ctx.device)
            start = time.perf_counter()
            try:
                loss = model.loss(batch)
                optimizer.zero_grad(set_to_none=True)
                if method != "adam":
                    optimizer.update_curvature()
                loss.backward()
                optimizer.step()
            except ValueError:  # non-finite outputs or factors: this setting diverged
                steps.append(step)
                seconds.append(elapsed)
                elbo.append(-math.inf)
                break
            synchronize(ctx.device)
            elapsed += time.perf_counter() - start
            if step % eval_every == 0 or step == budget:
                steps.append(step)
                seconds.append(elapsed)
                elbo.append(test_elbo(model, test_images))
                if not math.isfinite(elbo[-1]):
                    break  # diverged: the rest of the budget cannot recover it
                if stop_at is not None and elbo[-1] >= stop_at:
                    break
        if method != "adam":
            optimizer.remove_hooks()
        model.eval()
    return TrainingRun(method, dict(config), seed, steps, seconds, elbo, model)


@torch.no_grad()
def test_elbo(model: VAE, images: torch.Tensor) -> float:
    """Mean single-sample test ELBO (nats per image) with fixed noise, so that evaluations differ only by the model."""
    with torch.random.fork_rng(devices=[images.device] if images.device.type == "cuda" else []):
        torch.manual_seed(1234)
        try:
            return float(model.elbo(images).mean())
        except ValueError:  # NaN parameters after a divergence
            return -math.inf


def ratios(result: BatchResult, method: str, full_budget: bool) -> Tuple[List[float], List[float], List[bool]]:
    """(step ratios Adam / method, time ratios Adam / method, whether the method reached the target) per seed.

    Target: tuned Adam's mean ELBO after half the budget (full_budget False; Adam's own steps and time to it), or each
    seed's Adam ELBO after the whole budget (True; Adam's whole budget against the method's time to it)."""
    step_ratios, time_ratios, reached = [], [], []
    for adam, other in zip(result.runs["adam"], result.runs[method]):
        if full_budget:
            adam_steps, adam_time = adam.steps[-1], adam.seconds[-1]
            steps, seconds = other.reach(adam.final)
        else:
            adam_steps, adam_time = adam.reach(result.target)
            steps, seconds = other.reach(result.target)
        reached.append(steps is not None)
        if steps and adam_steps and seconds and adam_time:
            step_ratios.append(adam_steps / steps)
            time_ratios.append(adam_time / seconds)
    return step_ratios, time_ratios, reached


def summary_section(settings: Settings, results: List[BatchResult]) -> List[str]:
    lines = ["## Summary: speed-up over tuned Adam against batch size", "",
             f"VAE 784-{'-'.join(map(str, settings.hidden))}-{settings.latent_dim} (Bernoulli decoder, softplus). "
             "Speed-up = Adam's steps (or seconds) / the method's, to the target; mean ± 95 % Student-t interval over "
             "the seeds where both reached it (> 1: faster than Adam). Target 1: tuned Adam's mean test ELBO after "
             "half its budget; target 2: each seed's Adam test ELBO after the whole budget.", "",
             "| batch | steps | method | time per step (ms) | target 1: steps | target 1: wall time | "
             "target 2: steps | target 2: wall time | verdict on 3-5x (target 1, wall time) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        adam_ms = [r.seconds[-1] / r.steps[-1] * 1000 for r in result.runs["adam"] if r.steps[-1]]
        lines.append(f"| {result.batch_size} | {result.steps} | Adam | {format_interval(adam_ms, 1)} | 1 | 1 | 1 | 1 "
                     f"| - |")
        for method in ("natural", "geodesic"):
            per_step = [r.seconds[-1] / r.steps[-1] * 1000 for r in result.runs[method] if r.steps[-1]]
            cells = []
            for full in (False, True):
                step_ratios, time_ratios, reached = ratios(result, method, full)
                cells += [format_interval(step_ratios) + "x" if step_ratios else "not reached",
                          format_interval(time_ratios) + "x" if time_ratios else "not reached"]
            step_ratios, time_ratios, reached = ratios(result, method, False)
            adam_reached = [adam.reach(result.target)[0] is not None for adam in result.runs["adam"]]
            text = verdict(time_ratios, step_ratios, {"adam": adam_reached, "natural": reached})
            lines.append(f"| {result.batch_size} | {result.steps} | {NAMES[method]} | "
                         f"{format_interval(per_step, 1)} | " + " | ".join(cells) + f" | {text} |")
    lines.append("")
    return lines


def batch_section(settings: Settings, result: BatchResult) -> List[str]:
    b = result.batch_size
    lines = [f"## Batch {b}: {result.steps} steps per run "
             f"({result.steps * b / settings.n_train:.0f} epochs of {settings.n_train} images)", "",
             f"### Tuning (seed {result.best['adam'].seed}): final test ELBO after {result.steps} steps", "",
             "| method | settings | final test ELBO (nats) | training time (s) | best in the grid's interior? |",
             "|---|---|---|---|---|"]
    for method in ("adam", "natural"):
        grid = [run for run in result.tuning if run.method == method]
        for index, run in enumerate(grid):
            chosen = " (chosen)" if run is result.best[method] else ""
            interior = ""
            if run is result.best[method]:
                interior = "yes" if 0 < index < len(grid) - 1 else "no: at the edge of the grid"
            settings_text = ", ".join(f"{key}={value:g}" for key, value in run.config.items())
            lines.append(f"| {NAMES[method]} | {settings_text}{chosen} | {run.final:.2f} | {run.seconds[-1]:.1f} | "
                         f"{interior} |")
    lines += ["", f"### Per seed, target 1 = {result.target:.2f} nats (tuned Adam's mean after {result.half} steps)",
              "", "| seed | method | final ELBO | steps to target 1 | time to target 1 (s) | steps to target 2 | "
              "time to target 2 (s) |", "|---|---|---|---|---|---|---|"]
    for index, adam in enumerate(result.runs["adam"]):
        for method in METHODS:
            run = result.runs[method][index]
            first_steps, first_time = run.reach(result.target)
            if method == "adam":
                second_steps, second_time = run.steps[-1], run.seconds[-1]
            else:
                second_steps, second_time = run.reach(adam.final)
            cells = [str(first_steps) if first_steps is not None else "not reached",
                     f"{first_time:.1f}" if first_time is not None else "-",
                     str(second_steps) if second_steps is not None else "not reached",
                     f"{second_time:.1f}" if second_time is not None else "-"]
            lines.append(f"| {run.seed} | {NAMES[method]} | {run.final:.2f} | " + " | ".join(cells) + " |")
    # has tuned Adam flattened? its gain over the last fifth of the budget against its gain over the whole budget
    gains = []
    for adam in result.runs["adam"]:
        cut = max(step for step in adam.steps if step <= 0.8 * adam.steps[-1])
        gains.append(adam.final - adam.elbo[adam.steps.index(cut)])
    lines += ["", f"Tuned Adam's test ELBO gain over the last fifth of the budget: {format_interval(gains)} nats "
              f"(mean ± 95 % interval over seeds; near 0: flattened).", ""]
    return lines


def verdict(time_ratios: Sequence[float], step_ratios: Sequence[float], reached: Dict[str, List[bool]]) -> str:
    """A sentence stating whether the measured wall-time speed-up supports 'converges 3-5x faster than Adam'."""
    if not any(reached["natural"]):
        return ("does not hold here: K-FAC never reached tuned Adam's half-budget test ELBO within the full step "
                "budget.")
    if not time_ratios:
        return "cannot be judged: no seed where both methods reached the target."
    mean, half = mean_interval(time_ratios)
    step_mean, _ = mean_interval(step_ratios)
    low, high = (mean - half, mean + half) if math.isfinite(half) else (mean, mean)
    missed = len(reached["natural"]) - sum(reached["natural"])
    note = f" ({missed} natural-gradient run(s) never reached the target)" if missed else ""
    if high < 3:
        bound = f"95 % interval up to {high:.2f}x" if math.isfinite(half) else "a single seed, no interval"
        return (f"does not hold on this setup: the wall-time speed-up is {mean:.2f}x ({bound}), below 3x; in steps "
                f"it is {step_mean:.2f}x{note}.")
    if low >= 3:
        bound = f"95 % interval from {low:.2f}x" if math.isfinite(half) else "a single seed, no interval"
        return f"holds on this setup: the wall-time speed-up is {mean:.2f}x ({bound}){note}."
    return (f"inconclusive: the wall-time speed-up is {mean:.2f}x with a 95 % interval [{low:.2f}, {high:.2f}] that "
            f"straddles 3x{note}.")


def speedup_figure(results: List[BatchResult]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (first, second) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    batches = [result.batch_size for result in results]
    for axes, full, title in ((first, False, "target 1: tuned Adam's mean ELBO at half budget"),
                              (second, True, "target 2: each seed's Adam ELBO at full budget")):
        drawn = False
        for offset, method in ((-0.04, "natural"), (0.04, "geodesic")):
            means, halves, xs = [], [], []
            for result in results:
                _, time_ratios, _ = ratios(result, method, full)
                if time_ratios:
                    mean, half = mean_interval(time_ratios)
                    means.append(mean)
                    halves.append(half if math.isfinite(half) else 0.0)
                    xs.append(result.batch_size * 2 ** offset)
            if xs:  # a method that reached this target at no batch size has no point to draw
                axes.errorbar(xs, means, yerr=halves, marker="o", capsize=4, color=COLOURS[method],
                              label=f"{NAMES[method]} (mean ± 95 % interval)")
                drawn = True
        if not drawn:  # a short (--quick) budget may reach no target: say so instead of an empty log axis
            axes.text(0.5, 0.5, "no run reached this target", transform=axes.transAxes, ha="center", va="center")
        axes.axhline(1.0, color="black", linewidth=1, label="as fast as Adam")
        axes.axhspan(3.0, 5.0, color="tab:green", alpha=0.15, label="claimed 3-5x")
        axes.set_xscale("log", base=2)
        axes.set_xlim(min(batches) / 1.5, max(batches) * 1.5)  # fixed, so the log axis has limits without data
        axes.set_xticks(batches)
        axes.set_xticklabels([str(b) for b in batches])
        axes.set_xlabel("batch size")
        axes.set_title(title, fontsize=10)
        axes.grid(alpha=0.3)
    first.set_ylabel("wall-time speed-up over tuned Adam (x)")
    labelled = {}  # one legend for both panels: a method drawn in only one panel is still named
    for axes in (first, second):
        for handle, label in zip(*axes.get_legend_handles_labels()):
            labelled.setdefault(label, handle)
    second.legend(labelled.values(), labelled.keys(), fontsize=8, loc="upper left")
    figure.suptitle("Natural gradient against tuned Adam: wall-time speed-up to a test ELBO")
    figure.tight_layout()
    return figure


def training_figure(results: List[BatchResult]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, grid = plt.subplots(2, len(results), figsize=(5 * len(results), 8), squeeze=False)
    for column, result in enumerate(results):
        by_time, by_steps = grid[0][column], grid[1][column]
        finite = [e for method in METHODS for run in result.runs[method] for e in run.elbo if math.isfinite(e)]
        low = max(min(finite), result.target - 4 * (max(finite) - result.target) - 20)
        for method in METHODS:
            for index, run in enumerate(result.runs[method]):
                settings_text = ", ".join(f"{key}={value:g}" for key, value in run.config.items())
                label = f"{NAMES[method]} ({settings_text})" if index == 0 else None
                by_time.plot(run.seconds, run.elbo, color=COLOURS[method], alpha=0.8, label=label)
                by_steps.plot(run.steps, run.elbo, color=COLOURS[method], alpha=0.8, label=label)
        for axes, xlabel in ((by_time, "training wall time (s)"), (by_steps, "training steps")):
            axes.axhline(result.target, color="black", linestyle="--", linewidth=1, label="target 1")
            axes.set_ylim(low, max(finite) + 0.05 * (max(finite) - low))
            axes.set_xlabel(xlabel)
            axes.set_ylabel("test ELBO (nats per image)")
            axes.grid(alpha=0.3)
        by_time.set_title(f"batch {result.batch_size}: test ELBO against wall time", fontsize=10)
        by_steps.set_title(f"batch {result.batch_size}: test ELBO against steps", fontsize=10)
        by_steps.legend(loc="lower right", fontsize=7)
    figure.tight_layout()
    return figure


# ------------------------------------------------------------------------------------------------ latent refinement
@dataclass
class RefineOutcome:
    seed: int
    method_losses: Dict[str, torch.Tensor]  # method -> loss [steps + 1, N]
    best: torch.Tensor  # [N]
    steps_to_target: Dict[str, Optional[int]]
    seconds_to_target: Dict[str, Optional[float]]
    adam_lr: float
    elbo: Dict[str, float]


def refine_comparison(ctx: ExperimentContext, settings: Settings, model: VAE, images: torch.Tensor,
                      seed: int) -> RefineOutcome:
    decoder = model.decoder
    with torch.no_grad():
        mu, logvar = model.encoder(images)
    runs = {"natural": refine_latents(decoder, images, mu, "bernoulli", steps=settings.natural_refine_steps),
            "gradient": refine_latents(decoder, images, mu, "bernoulli", steps=settings.other_refine_steps,
                                       method="gradient")}
    adam_runs = {lr: refine_latents(decoder, images, mu, "bernoulli", steps=settings.other_refine_steps, method="adam",
                                    lr=lr) for lr in settings.refine_adam_lrs}
    best = torch.stack([run.loss.min(0).values for run in [*runs.values(), *adam_runs.values()]]).min(0).values
    target = best + REFINE_TOLERANCE

    def steps_needed(loss: torch.Tensor) -> Optional[int]:
        fraction = (loss <= target).float().mean(1)
        hits = (fraction >= REFINE_QUANTILE).nonzero()
        return int(hits[0]) if len(hits) else None

    adam_lr = min(adam_runs, key=lambda lr: (steps_needed(adam_runs[lr].loss) or math.inf,
                                             float(adam_runs[lr].loss[-1].mean())))
    runs["adam"] = adam_runs[adam_lr]
    steps_to_target, seconds_to_target = {}, {}
    for method, result in runs.items():
        steps = steps_needed(result.loss)
        steps_to_target[method] = steps
        if steps is None:
            seconds_to_target[method] = None
            continue
        # the wall time of a run of exactly that many steps (best of 2: a shared machine's slow spells hit them alike)
        options = dict(method=method, lr=adam_lr if method == "adam" else 1.0)
        seconds_to_target[method] = min(timed(lambda: refine_latents(decoder, images, mu, "bernoulli", steps=steps,
                                                                      **options), ctx.device) for _ in range(2))
    refined = runs["natural"]
    generator = torch.Generator().manual_seed(seed)
    encoder_scale = torch.diag_embed((0.5 * logvar).exp())
    elbo = {"encoder": gaussian_elbo(decoder, images, mu, encoder_scale, settings.elbo_samples, generator),
            "refined mean, encoder variance": gaussian_elbo(decoder, images, refined.z, encoder_scale,
                                                            settings.elbo_samples, generator),
            "refined mean, Laplace covariance": gaussian_elbo(decoder, images, refined.z,
                                                              torch.linalg.cholesky(refined.covariance),
                                                              settings.elbo_samples, generator)}
    return RefineOutcome(seed, {m: r.loss for m, r in runs.items()}, best, steps_to_target, seconds_to_target,
                         adam_lr, elbo)


def timed(fn, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


@torch.no_grad()
def gaussian_elbo(decoder, images: torch.Tensor, mean: torch.Tensor, scale_tril: torch.Tensor, samples: int,
                  generator: torch.Generator) -> float:
    """Mean ELBO (nats per image) of q = N(mean, L L^T) (mean [N, d], L [N, d, d]) under the Bernoulli decoder and
    the N(0, I) prior: E_q log p(x | z) by `samples` draws, KL(q || N(0, I)) in closed form."""
    N, d = mean.shape
    noise = torch.randn(samples, N, d, generator=generator).to(mean)
    z = mean + (scale_tril @ noise.unsqueeze(-1)).squeeze(-1)  # [S, N, d]
    logits = decoder(z.reshape(-1, d)).reshape(samples, N, -1)
    log_likelihood = -F.binary_cross_entropy_with_logits(logits, images.expand_as(logits), reduction="none").sum(-1)
    trace = scale_tril.square().sum((-2, -1))
    log_det = 2 * scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    kl = 0.5 * (trace + mean.square().sum(-1) - d - log_det)
    return float((log_likelihood.mean(0) - kl).mean())


def refinement_section(settings: Settings, outcomes: List[RefineOutcome], batch_size: int) -> List[str]:
    methods = ("natural", "gradient", "adam")
    names = {"natural": "natural (Fisher G + I, line search)", "gradient": "gradient descent (line search)",
             "adam": "Adam"}
    budgets = {"natural": settings.natural_refine_steps, "gradient": settings.other_refine_steps,
               "adam": settings.other_refine_steps}
    lines = ["## Latent refinement on the trained decoder", "",
             f"{settings.refine_points} test images per seed, started at the encoder means of each seed's tuned-Adam "
             f"model (batch {batch_size}); per-point objective -log p(x | z) - log N(z; 0, I) (Bernoulli decoder). Target: "
             f"{REFINE_QUANTILE:.0%} of the points within {REFINE_TOLERANCE} nats of the best objective any method "
             f"found for them. Time: one run of exactly the steps needed (best of two). Adam's learning rate tuned "
             f"over {', '.join(f'{lr:g}' for lr in settings.refine_adam_lrs)} per seed (chosen: "
             f"{', '.join(f'{o.adam_lr:g}' for o in outcomes)}).", "",
             "| method | step budget | seeds reaching the target | steps to the target | time to the target (s) |",
             "|---|---|---|---|---|"]
    for method in methods:
        steps = [o.steps_to_target[method] for o in outcomes if o.steps_to_target[method] is not None]
        seconds = [o.seconds_to_target[method] for o in outcomes if o.seconds_to_target[method] is not None]
        lines.append(f"| {names[method]} | {budgets[method]} | {len(steps)} / {len(outcomes)} | "
                     f"{format_interval(steps, 1) if steps else '-'} | "
                     f"{format_interval(seconds) if seconds else '-'} |")
    for other in ("gradient", "adam"):
        ratios = [o.seconds_to_target[other] / o.seconds_to_target["natural"] for o in outcomes
                  if o.seconds_to_target[other] is not None and o.seconds_to_target["natural"] is not None]
        if ratios:
            lines.append(f"\nWall-time ratio {other} / natural to the target: {format_interval(ratios)}x "
                         f"(over {len(ratios)} seed(s)).")
    start_gap = [float((o.method_losses["natural"][0] - o.best).mean()) for o in outcomes]
    lines += ["", f"Mean objective gap at the encoder means: {format_interval(start_gap)} nats per point.", "",
              "### Amortisation gap", "",
              f"Test ELBO (nats per image, {settings.elbo_samples} posterior samples per image) of the encoder's "
              f"posterior against Gaussians at the natural-refined latents:", "",
              "| posterior | ELBO (mean ± 95 % interval over seeds) | gain over the encoder |", "|---|---|---|"]
    encoder = [o.elbo["encoder"] for o in outcomes]
    for name in outcomes[0].elbo:
        values = [o.elbo[name] for o in outcomes]
        gain = [value - base for value, base in zip(values, encoder)]
        lines.append(f"| {name} | {format_interval(values)} | {format_interval(gain) if name != 'encoder' else '-'} |")
    lines.append("")
    return lines


def refinement_figure(outcome: RefineOutcome):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.5, 4.2))
    for method, colour in (("natural", "tab:red"), ("gradient", "tab:green"), ("adam", "tab:blue")):
        gap = (outcome.method_losses[method] - outcome.best).mean(1).clamp_min(1e-4)
        label = method if method != "adam" else f"adam (lr={outcome.adam_lr:g})"
        axes.plot(range(len(gap)), gap.cpu(), color=colour, label=label)
    axes.axhline(REFINE_TOLERANCE, color="black", linestyle="--", linewidth=1, label=f"{REFINE_TOLERANCE} nats")
    axes.set_yscale("log")
    axes.set_xlabel("refinement steps")
    axes.set_ylabel("mean objective above the best found (nats, floor 1e-4)")
    axes.set_title(f"Latent refinement (seed {outcome.seed})")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return figure


def deviations(settings: Settings, ctx: ExperimentContext) -> List[str]:
    budgets = ", ".join(f"{steps} steps at batch {b} ({steps * b / settings.n_train:.0f} epochs)"
                        for b, steps in zip(settings.batch_sizes, settings.steps))
    return ["## Deviations and caveats", "",
            f"- Scaled to this shared CPU machine: {settings.n_train} training images, test ELBO on "
            f"{settings.n_test} test images; budgets {budgets}. The paper's model, data size and budget are not "
            "stated in a form we could reproduce.",
            "- Tuned on the first seed only: Adam's learning rate by the final test ELBO of the budget, K-FAC's KL "
            f"clip (lr {settings.natural_lr:g}, damping {settings.natural_damping:g} fixed from the earlier tuning) "
            "by the fewest steps to the first seed's target 2; the first seed's tuned runs are reused as its "
            "reported runs. The geodesic correction is not tuned separately (it runs with K-FAC's chosen setting).",
            "- K-FAC runs stop once they have reached both targets of their seed (the rest of the budget cannot "
            "change a time to a target), so their curves end early and they have no full-budget final ELBO.",
            f"- Steps and times to a target are read at the test evaluations ({settings.evaluations} per run): the "
            "first evaluation at or above the target.",
            "- Wall times on a CPU shared with other jobs (one torch thread per process): ratios from runs that "
            "interleave with the same load are meaningful, absolute times less so. K-FAC's extra cost per step (the "
            "sampled-target backward and the factor refresh with Cholesky inverses of up to 785 x 785 matrices every "
            f"{settings.curvature_every} steps, and the preconditioning products of every layer, in low-rank form "
            "where the batch is small) is a larger share of a step on a CPU than on a GPU.",
            "- The geodesic correction (Song, Song & Ermon 2018; docs/MATH.md section 6) uses the Levi-Civita "
            "connection (alpha = 0) of the same Fisher K-FAC approximates, estimated on the step's mini-batch; it "
            "costs two extra forward passes and one backward per step.", ""]
