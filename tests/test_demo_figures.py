"""Every figure of the quick demo, checked through matplotlib's own objects (not pixels): titles, axis labels, legends
for every marker and line kind, labelled colour bars, one colour map for log volume, digits black on white, no title
or legend running into another axes, nothing outside the figure, readable sizes; and the report links every PNG."""
import struct

import numpy as np
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import PathCollection
from matplotlib.colors import to_rgba

from pygeo.cli import context
from pygeo.cli.demo import SECTIONS, run_demo

MIN_FONT_SIZE = 7  # points: readable at 100 % zoom
MIN_WIDTH = 600  # pixels of a saved PNG


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick-demo")
    result = run_demo(out, quick=True, device="cpu", progress=False)
    assert not result.failed_sections, (out / "report.md").read_text()
    return out, result


def test_the_report_links_every_png_and_every_figure_was_registered(demo):
    out, result = demo
    report = (out / "report.md").read_text()
    written = sorted(path.name for path in out.glob("*.png"))
    assert written and written == sorted(result.figures), "every PNG is saved through DemoContext.save_figure"
    for name in written:
        assert f"]({name})" in report, f"report.md does not show {name}"
    assert len(written) >= 2 * len(SECTIONS) - 1


def test_the_report_starts_with_the_backends_of_every_section(demo):
    out, result = demo
    head = (out / "report.md").read_text().split("## ")[0]
    assert "Backends by section" in head
    for section in SECTIONS:
        assert f"- {section}: " in head
    assert set(result.kernels) == set(SECTIONS)


def _png_width(path) -> int:
    with open(path, "rb") as handle:
        header = handle.read(24)
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">I", header[16:20])[0]


def _colorbar_axes(figure):
    bars = {}
    for axes in figure.axes:
        for artist in axes.images + axes.collections:
            if getattr(artist, "colorbar", None) is not None:
                bars[artist.colorbar.ax] = artist.colorbar
    return bars


def _legend_texts(figure, axes):
    legends = [axes.get_legend()] + list(figure.legends)
    return {text.get_text() for legend in legends if legend is not None for text in legend.get_texts()}


def _kind(artist):
    """What a legend entry has to stand for: colour and line style of a line, colour and marker of a scatter."""
    if isinstance(artist, PathCollection):
        colours = artist.get_facecolors()
        colour = tuple(np.round(colours[0], 2)) if len(colours) else None
        return ("points", colour, artist.get_paths()[0].vertices.shape[0] if artist.get_paths() else 0)
    return ("line", tuple(np.round(to_rgba(artist.get_color()), 2)), artist.get_linestyle(), artist.get_marker())


def _overlaps(first, second, slack=1.0) -> bool:
    return (first.x0 < second.x1 - slack and second.x0 < first.x1 - slack and
            first.y0 < second.y1 - slack and second.y0 < first.y1 - slack)


@pytest.mark.parametrize("name", sorted({f"{stem}.png" for stem in (
    "pullback_volume", "pullback_decoded", "latent_metric_samples", "latent_metric_scatter",
    "latent_metric_interpolation", "geodesics_paths", "geodesics_distance_matrices", "langevin_latents",
    "langevin_decoded", "kahler_det_heatmap", "kahler_samples")}))
def test_figure_is_readable(demo, name):
    out, result = demo
    assert name in result.figures, f"{name} was not produced"
    assert _png_width(out / name) >= MIN_WIDTH, f"{name} is too small to read at 100 %"
    check_figure(result.figures[name], name)


def test_the_check_catches_what_the_old_figures_did_wrong():
    """The faults of the demo's earlier figures fail the check: no axis labels or legend, a title running into the
    colour bar of its neighbour, an unlabelled colour bar."""
    from matplotlib.figure import Figure

    def scatter_without_labels():
        figure = Figure(figsize=(5, 4))
        axes = figure.subplots()
        axes.scatter([0, 1], [1, 0], color="tab:blue")
        axes.plot([0, 1], [0, 1], "--", color="white")
        axes.set_title("geodesics (cyan) and straight lines (dashed)")
        return figure

    def titles_into_colour_bars():
        figure = Figure(figsize=(10, 4.3))
        for position in range(2):
            axes = figure.add_subplot(1, 2, position + 1)
            image = axes.imshow(np.random.rand(10, 10), cmap="viridis")
            axes.set_xlabel("digit class")
            axes.set_ylabel("digit class")
            axes.set_title("a long title of a distance matrix between the classes (scaled)")
            figure.colorbar(image, ax=axes, label="distance")
        return figure

    def unlabelled_colour_bar():
        figure = Figure(figsize=(5, 4), layout="constrained")
        axes = figure.subplots()
        image = axes.imshow(np.random.rand(10, 10), cmap="viridis")
        axes.set(title="heat map", xlabel="z1", ylabel="z2")
        figure.colorbar(image, ax=axes)
        return figure

    for make in (scatter_without_labels, titles_into_colour_bars, unlabelled_colour_bar):
        with pytest.raises(AssertionError):
            check_figure(make(), make.__name__)


def check_figure(figure, name: str) -> None:
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    renderer = canvas.get_renderer()
    bars = _colorbar_axes(figure)
    main_axes = [axes for axes in figure.axes if axes not in bars and axes.get_visible()]
    assert main_axes
    figure_box = figure.bbox
    titles = []
    for axes in main_axes:
        title = axes.get_title() or axes.get_title("left")
        assert title.strip(), f"{name}: an axes without a title"
        titles.append(axes.title)
        has_ticks = len(axes.get_xticks()) > 0 and axes.axison
        points = [c for c in axes.collections if isinstance(c, PathCollection)]
        drawn = points + list(axes.lines)
        if has_ticks:
            assert axes.get_xlabel().strip() and axes.get_ylabel().strip(), f"{name}: {title!r} has no axis labels"
        if points:  # a scatter over a plane of latent codes: the axes are z1 and z2
            assert "z1" in axes.get_xlabel() and "z2" in axes.get_ylabel(), f"{name}: {title!r} axes not z1, z2"
        # Every marker and line kind is in a legend: labelled artists by their label, unlabelled ones by a labelled
        # artist of the same kind.
        legend = _legend_texts(figure, axes)
        labelled = [a for a in drawn if not a.get_label().startswith("_")]
        for artist in labelled:
            assert artist.get_label() in legend, f"{name}: {artist.get_label()!r} missing from the legend"
        kinds = {_kind(a) for a in labelled}
        for artist in drawn:
            if artist.get_label().startswith("_"):
                assert _kind(artist) in kinds, f"{name}: {title!r} has a marker or line kind without a legend entry"
        for image in axes.images:
            cmap = image.get_cmap().name
            if cmap == "gray_r":  # digits: black on white, the full [0, 1] range
                assert image.get_clim() == (0, 1), f"{name}: digits not drawn on [0, 1]"
                continue
            # A heat map has its own colour bar, or shares one with a heat map of the same colour map and limits.
            shared = {(i.get_cmap().name, i.get_clim()) for a in main_axes for i in a.images if i.colorbar is not None}
            assert image.colorbar is not None or (cmap, image.get_clim()) in shared, \
                f"{name}: {title!r} has a heat map without a colour bar"
        assert cmap_name_ok(axes, bars, name)
    for bar_axes, bar in bars.items():
        label = bar.ax.get_ylabel() or bar.ax.get_xlabel()
        assert label.strip(), f"{name}: a colour bar without a label"
    # Nothing runs into anything: titles and legends do not overlap other axes, colour bars or one another, and every
    # text lies inside the figure (not clipped).
    texts = titles + ([figure._suptitle] if figure._suptitle is not None else [])
    boxes = [text.get_window_extent(renderer) for text in texts if text.get_text()]
    legends = [a.get_legend() for a in main_axes if a.get_legend() is not None] + list(figure.legends)
    legend_boxes = [legend.get_window_extent(renderer) for legend in legends]
    for index, box in enumerate(boxes + legend_boxes):
        assert box.x0 >= figure_box.x0 - 1 and box.x1 <= figure_box.x1 + 1 and box.y0 >= figure_box.y0 - 1 \
            and box.y1 <= figure_box.y1 + 1, f"{name}: a title or legend is clipped by the figure's edge"
        for other in (boxes + legend_boxes)[index + 1:]:
            assert not _overlaps(box, other), f"{name}: titles or legends overlap"
        for bar_axes in bars:
            assert not _overlaps(box, bar_axes.get_window_extent(renderer)), f"{name}: text runs into a colour bar"
    for axes in main_axes:
        for text in [axes.title, axes.xaxis.label, axes.yaxis.label] + axes.get_xticklabels() + axes.get_yticklabels():
            if text.get_text() and text.get_visible():
                assert text.get_fontsize() >= MIN_FONT_SIZE, f"{name}: text {text.get_text()!r} is too small"
    for legend in legends:
        for text in legend.get_texts():
            assert text.get_fontsize() >= MIN_FONT_SIZE, f"{name}: legend text {text.get_text()!r} is too small"


def cmap_name_ok(axes, bars, name) -> bool:
    """Log volume gets one colour map everywhere."""
    for image in axes.images:
        if image.colorbar is None:
            continue
        label = image.colorbar.ax.get_ylabel() or image.colorbar.ax.get_xlabel()
        if "log volume" in label:
            assert image.get_cmap().name == context.log_volume_colormap().name, \
                f"{name}: log volume drawn with {image.get_cmap().name}"
    return True
