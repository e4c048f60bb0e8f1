"""Demo section: statistics on the latent manifold (pygeo.statistics, pygeo.log_map, pygeo.parallel_transport): per
class the Frechet mean of the codes decoded beside their Euclidean mean, the first principal geodesic of two classes
over the volume element, and an edit direction moved from one class mean to another by parallel transport."""
from __future__ import annotations

import numpy as np
import torch
from matplotlib.figure import Figure

import pygeo

from ... import statistics
from ...geometry import volume_map
from .. import context

TITLE = "Statistics on the latent manifold: Frechet means, principal geodesics, parallel transport"

_NEIGHBOURS = 10  # nearest training digits that vote for the label of a decoded mean


def run(ctx: "context.DemoContext") -> str:
    with torch.no_grad():  # the decoder's parameters require grad; nothing here differentiates them
        return _run(ctx)


def _run(ctx: "context.DemoContext") -> str:
    metric, codes, labels = ctx.metric, ctx.latents.detach(), ctx.labels
    classes = [int(c) for c in labels.unique().tolist()]
    if ctx.quick:
        classes = classes[:2]
    per_class = 8 if ctx.quick else 150
    generator = torch.Generator().manual_seed(ctx.seed)
    members = {}
    for digit in classes:
        index = (labels.cpu() == digit).nonzero().flatten()
        members[digit] = index[torch.randperm(len(index), generator=generator)[:per_class]].to(codes.device)

    frechet, euclidean, variances, euclidean_variances, iterations, converged = [], [], [], [], [], []
    with ctx.timed("statistics: Frechet means per class"):
        for digit in ctx.progress(classes, desc="Frechet means"):
            x = codes[members[digit]]
            result = statistics.frechet_mean(metric, x, max_iter=15 if ctx.quick else 100)
            frechet.append(result.mean)
            euclidean.append(x.mean(0))
            variances.append(float(result.variance))
            iterations.append(result.n_iter)
            converged.append(result.converged)
            # the mean squared geodesic distance from the Euclidean mean: how much worse it is as a centre
            logs = pygeo.log_map(metric, x.mean(0), x)
            G = metric.metric(x.mean(0)[None])[0]
            euclidean_variances.append(float(torch.einsum("ni,ij,nj->n", logs, G, logs).mean()))
    frechet, euclidean = torch.stack(frechet), torch.stack(euclidean)
    with torch.no_grad():
        decoded_frechet = torch.sigmoid(ctx.vae.decoder(frechet))
        decoded_euclidean = torch.sigmoid(ctx.vae.decoder(euclidean))
    vote_frechet = _neighbour_votes(decoded_frechet, ctx.images, labels)
    vote_euclidean = _neighbour_votes(decoded_euclidean, ctx.images, labels)
    target = torch.tensor(classes, device=labels.device)
    confidence_frechet = vote_frechet[torch.arange(len(classes)), target].cpu()
    confidence_euclidean = vote_euclidean[torch.arange(len(classes)), target].cpu()
    means_figure = ctx.save_figure(
        context.digit_grids_side_by_side(decoded_frechet, decoded_euclidean,
                                         f"Frechet means of the codes, decoded (classes {classes[0]}..{classes[-1]})",
                                         "Euclidean means of the codes, decoded"),
        "statistics_means.png", "per class: the decoded Frechet mean beside the decoded Euclidean mean")

    # Principal geodesics of two classes, and an edit direction of the first transported to the second.
    first, second = classes[0], classes[1] if len(classes) > 1 else classes[0]
    with ctx.timed("statistics: tangent PCA and transport"):
        pcas = {digit: statistics.tangent_pca(metric, codes[members[digit]], n_components=1,
                                              mean=frechet[classes.index(digit)])
                for digit in (first, second)}
        curves = {digit: _principal_geodesic(metric, pca, 9 if ctx.quick else 21) for digit, pca in pcas.items()}
        edit = pcas[first].components[0] * pcas[first].explained_variance[0].sqrt()  # one standard deviation
        start, end = pcas[first].mean, pcas[second].mean
        moved = pygeo.parallel_transport(metric, start[None], end[None], edit[None])[0]
        G_start, G_end = metric.metric(start[None])[0], metric.metric(end[None])[0]
        norm_before = float((edit @ G_start @ edit).sqrt())
        norm_after = float((moved @ G_end @ moved).sqrt())
        naive_norm = float((edit @ G_end @ edit).sqrt())
        cosine = float((moved @ G_end @ edit) / (norm_after * naive_norm))
        steps = torch.linspace(-1.5, 1.5, 7, dtype=codes.dtype, device=codes.device)[:, None]
        along_first = pygeo.exp_map(metric, start.expand(7, -1).contiguous(), steps * edit)
        along_moved = pygeo.exp_map(metric, end.expand(7, -1).contiguous(), steps * moved)
        along_copied = pygeo.exp_map(metric, end.expand(7, -1).contiguous(), steps * edit)
    shown = torch.cat([members[first], members[second]])
    every = torch.cat([codes[shown], *curves.values(), along_moved, along_copied])
    low = (every.min(0).values - 0.3).tolist()
    high = (every.max(0).values + 0.3).tolist()
    with ctx.timed("statistics: volume map"):
        volume = volume_map(metric, low, high, 16 if ctx.quick else 90, dtype=codes.dtype, progress=ctx.show_progress)
    geodesic_figure = ctx.save_figure(
        _plot_principal_geodesics(volume, codes[shown].cpu().numpy(), labels[shown].cpu().numpy(), frechet,
                                  euclidean, classes, (first, second), curves, (start, edit), (end, moved, along_moved,
                                                                                             along_copied)),
        "statistics_principal_geodesics.png",
        "first principal geodesics of two classes and a transported edit direction over the volume element")
    with torch.no_grad():
        rows = torch.sigmoid(ctx.vae.decoder(torch.cat([along_first, along_moved, along_copied])))
    edit_figure = _plot_edit_rows(rows, first, second)
    edit_markdown = ctx.save_figure(edit_figure, "statistics_transported_edit.png",
                                    "an edit direction of one class applied at another class's mean")

    better = int((confidence_frechet > confidence_euclidean).sum())
    worse = int((confidence_frechet < confidence_euclidean).sum())
    # how much lower the Frechet mean's mean squared distance is, relative to the Euclidean mean's; float32 log maps
    # (residual 1e-5 relative, times the exp map's condition) give each variance to a few 1e-4 relative, so smaller
    # differences say the two centres are equally good, not which is better
    gain = [(e - f) / e if e > 0 else 0.0 for f, e in zip(variances, euclidean_variances)]
    resolution = 1e-3 if codes.dtype == torch.float32 else 1e-8
    lines = [
        f"For each of {len(classes)} digit classes ({per_class} codes each at most), the Frechet mean on the decoder's "
        "pullback metric (pygeo.statistics.frechet_mean: Karcher flow over batched log maps) beside the Euclidean "
        "mean of the same codes, both decoded. The label of a decoded mean is judged by its "
        f"{_NEIGHBOURS} nearest training digits in pixel space (the share of them with the class's label; the demo's "
        "context carries no MNIST folder for pygeo.evaluate.MNISTFeatures).",
        "",
        means_figure,
        "",
        "| class | Karcher iterations | converged | mean sq. distance to Frechet mean | to Euclidean mean | "
        "neighbour vote, Frechet | neighbour vote, Euclidean |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, digit in enumerate(classes):
        lines.append(f"| {digit} | {iterations[k]} | {'yes' if converged[k] else 'no'} | {variances[k]:.3f} | "
                     f"{euclidean_variances[k]:.3f} | {float(confidence_frechet[k]):.1f} | "
                     f"{float(confidence_euclidean[k]):.1f} |")
    lines += [
        "",
        "What the numbers show: the Frechet mean is by construction the better centre in the metric ("
        + (f"its mean squared geodesic distance is {100 * np.mean(gain):.2g} % lower than the Euclidean mean's on "
           f"average, never higher beyond rounding: {'yes' if min(gain) >= -resolution else 'no'}"
           if max(abs(g) for g in gain) >= resolution else
           "here its mean squared geodesic distance equals the Euclidean mean's to within what the log maps resolve "
           f"(relative difference below {resolution:.0e}): on these codes the two centres nearly coincide")
        + "); as a decoded image it is judged more like its class than the "
        f"Euclidean mean for {better} classes, less for {worse}, equally for {len(classes) - better - worse} "
        f"(mean vote {float(confidence_frechet.mean()):.2f} against {float(confidence_euclidean.mean()):.2f}). "
        + ("So here the Frechet mean decodes better on this measure." if better > worse else
           "So here the Frechet mean does not decode better on this measure: both centres sit inside the class's "
           "region of the latent space, where the decoder gives a clean digit either way."),
        "",
        geodesic_figure,
        "",
        f"Tangent PCA at the Frechet means (pygeo.statistics.tangent_pca, components orthonormal in G): the first "
        f"principal geodesic of class {first} explains {100 * float(pcas[first].explained_variance_ratio[0]):.0f} % of "
        f"its tangent variance, that of class {second} "
        f"{100 * float(pcas[second].explained_variance_ratio[0]):.0f} %. The edit direction (one standard deviation "
        f"along class {first}'s first component) was moved to class {second}'s mean by parallel transport along the "
        f"geodesic between the means: its length in the metric is {norm_before:.3f} before and {norm_after:.3f} after "
        f"(transport preserves it), whereas copying the same coordinates to the other mean gives length "
        f"{naive_norm:.3f} and differs in direction from the transported vector by "
        f"{np.degrees(np.arccos(np.clip(cosine, -1, 1))):.0f} degrees in G.",
        "",
        edit_markdown,
    ]
    return "\n".join(lines)


def _neighbour_votes(decoded: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[M, 10]: for each decoded image the share of its nearest training digits (pixel distance) of each label."""
    distances = torch.cdist(decoded.float(), images.float())
    nearest = distances.topk(min(_NEIGHBOURS, len(images)), largest=False).indices
    votes = torch.zeros(len(decoded), 10, device=decoded.device)
    votes.scatter_add_(1, labels[nearest], torch.ones_like(nearest, dtype=votes.dtype))
    return votes / nearest.shape[1]


def _principal_geodesic(metric, pca, n: int) -> torch.Tensor:
    """exp_mean(t a) for t from -2 to 2 standard deviations of the scores along the first component a: [n, d]."""
    spread = pca.explained_variance[0].sqrt()
    steps = torch.linspace(-2, 2, n, dtype=pca.mean.dtype, device=pca.mean.device)[:, None] * spread
    return pygeo.exp_map(metric, pca.mean.expand(n, -1).contiguous(), steps * pca.components[0])


def _plot_principal_geodesics(volume, shown_codes, shown_labels, frechet, euclidean, classes, pair, curves,
                              start_edit, end_edit) -> Figure:
    figure = Figure(figsize=(8.4, 8.0), dpi=110, layout="constrained")
    axes = figure.add_subplot()
    xs, ys = (axis.cpu().numpy() for axis in volume.axes)
    heat = axes.imshow(volume.log_volume.T.cpu().numpy(), origin="lower", extent=(xs[0], xs[-1], ys[0], ys[-1]),
                       aspect="auto", cmap=context.log_volume_colormap())
    figure.colorbar(heat, ax=axes, label=context.LOG_VOLUME_LABEL)
    context.scatter_classes(axes, shown_codes, shown_labels, size=6, alpha=0.5)
    palette = context.class_palette()
    for digit in pair:
        k = classes.index(digit)
        curve = curves[digit].cpu().numpy()
        axes.plot(curve[:, 0], curve[:, 1], color=palette[digit % 10], linewidth=2.5,
                  label=f"first principal geodesic of {digit} (+-2 sd)")
        axes.scatter([float(frechet[k, 0])], [float(frechet[k, 1])], marker="*", s=220, color=palette[digit % 10],
                     edgecolors="black", linewidths=0.8, label=f"Frechet mean of {digit}")
        axes.scatter([float(euclidean[k, 0])], [float(euclidean[k, 1])], marker="P", s=90, color=palette[digit % 10],
                     edgecolors="black", linewidths=0.8, label=f"Euclidean mean of {digit}")
    (start, edit), (end, moved, along_moved, along_copied) = start_edit, end_edit
    for base, vector, colour in ((start, edit, "tab:red"), (end, moved, "tab:red"), (end, edit, "tab:purple")):
        axes.annotate("", xy=(float(base[0] + vector[0]), float(base[1] + vector[1])),
                      xytext=(float(base[0]), float(base[1])),
                      arrowprops=dict(arrowstyle="->", color=colour, linewidth=1.8))
    moved_path, copied_path = along_moved.cpu().numpy(), along_copied.cpu().numpy()
    axes.plot(moved_path[:, 0], moved_path[:, 1], color="tab:red", linestyle="--", linewidth=1.5,
              label=f"edit a of {pair[0]} transported to {pair[1]}: exp(t P a)")
    axes.plot(copied_path[:, 0], copied_path[:, 1], color="tab:purple", linestyle=":", linewidth=1.5,
              label=f"edit a copied to {pair[1]}: exp(t a)")
    # below the plot, inside the figure (constrained layout makes room): beside it, the legend ran off the edge
    figure.legend(*axes.get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize=8)
    axes.set_xlim(xs[0], xs[-1])
    axes.set_ylim(ys[0], ys[-1])
    axes.set_xlabel("z1")
    axes.set_ylabel("z2")
    axes.set_title(f"Principal geodesics of digits {pair[0]} and {pair[1]}; an edit moved by parallel transport")
    return figure


def _plot_edit_rows(rows: torch.Tensor, first: int, second: int) -> Figure:
    figure = Figure(figsize=(9, 4.6), layout="constrained")
    axes = figure.add_subplot()
    context.show_digits(axes, rows, 7, f"rows: the edit at the mean of {first}; transported to {second}; "
                                       f"copied to {second}")
    return figure
