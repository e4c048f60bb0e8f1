"""The documentation site's API reference covers the public names (fast: no Sphinx build).

docs/_ext/pygeo_api.py generates one reference page per public module from its __all__; these tests import it and
check that every public name of DESIGN.md ("Public names") that exists in this version of the package has an entry,
that a name added to a module's __all__ gets one without editing the docs, and that the docstring converter of
docs/_ext/plain_docstrings.py makes the plain-text layouts safe for reStructuredText. The site itself is built, with
warnings as errors and every gallery example executed, by the docs step of .ci/run.
"""
import ast
import importlib.util
import inspect
import re
import sys
import types
from pathlib import Path

import pytest

import pygeo

ROOT = Path(__file__).resolve().parent.parent
EXT = ROOT / "docs" / "_ext"

# DESIGN.md's "Public names", as dotted paths (methods of every metric as pygeo.Metric.<name>). Names that this version
# does not have yet (other branches add them) are skipped, not failed; when the design file is beside the checkout
# (../shared/DESIGN.md) its names are read from it too, so a name added there is checked without editing this list.
DESIGN_NAMES = """
pygeo.backends pygeo.ops.jtj pygeo.PullbackMetric pygeo.LatentMetric pygeo.LatentMetric.from_encoder
pygeo.FunctionMetric pygeo.LSEKahlerMetric pygeo.Metric.metric pygeo.Metric.metric_and_derivative
pygeo.Metric.log_volume pygeo.Metric.inner pygeo.christoffel pygeo.curvature pygeo.sectional_curvature
pygeo.geodesic pygeo.exp_map pygeo.geodesic_distances pygeo.sample.riemannian_uniform
pygeo.sample.riemannian_langevin pygeo.geometry.volume_map pygeo.evaluate.frechet_distance
pygeo.evaluate.precision_recall pygeo.evaluate.outlier_rate pygeo.evaluate.MNISTFeatures
pygeo.evaluate.MNISTFeatures.features pygeo.evaluate.MNISTFeatures.predict_proba pygeo.optim.refine_latents
pygeo.optim.NaturalGradient pygeo.diagnostics.kl_per_dimension pygeo.diagnostics.active_units
pygeo.diagnostics.mutual_information pygeo.diagnostics.bhattacharyya_coefficient pygeo.diagnostics.posterior_balls
pygeo.diagnostics.collapse_report pygeo.metrics.EnsembleMetric pygeo.log_map pygeo.parallel_transport
pygeo.statistics.frechet_mean pygeo.statistics.tangent_pca pygeo.statistics.wrapped_normal
pygeo.cluster.geodesic_kmedoids pygeo.sample.brownian_motion pygeo.models.VAE pygeo.models.train_vae
""".split()


def _load(name: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(f"_docs_{name}", EXT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


api = _load("pygeo_api")
plain = _load("plain_docstrings")


def design_names():
    names = set(DESIGN_NAMES)
    design = ROOT.parent / "shared" / "DESIGN.md"
    if design.is_file():
        text = design.read_text()
        section = text.split("## Public names", 1)[-1].split("\n## ", 1)[0]
        for line in section.splitlines():
            code = line.split("#", 1)[0]        # comments name options and attributes, not entries
            names |= set(re.findall(r"\bpygeo(?:\.[A-Za-z_]\w*)+", code))
            names |= {f"pygeo.Metric.{method}" for method in re.findall(r"\bmetric\.(\w+)\(", code)}
    return sorted(names)


def resolve(dotted: str):
    """The object a dotted name names, or None where this version does not have it."""
    parts = dotted.split(".")
    obj = pygeo
    for index, part in enumerate(parts[1:], start=1):
        if hasattr(obj, part):
            obj = getattr(obj, part)
            continue
        try:  # a submodule not imported as an attribute
            obj = importlib.import_module(".".join(parts[:index + 1]))
        except ImportError:
            return None
    return obj


@pytest.fixture(scope="module")
def reference():
    return api.entries()


@pytest.mark.parametrize("dotted", design_names())
def test_every_existing_public_name_has_a_reference_entry(dotted, reference):
    obj = resolve(dotted)
    if obj is None:
        pytest.skip(f"{dotted} is not in this version of pygeo")
    if inspect.ismodule(obj):
        assert obj.__name__ in reference[0], f"module {obj.__name__} has no page in the API reference"
        return
    assert api.has_entry(obj), (f"{dotted} has no entry in the API reference: add it to its module's __all__ (and "
                                "give it a docstring if it is a method)")


def test_every_public_subpackage_has_a_page(reference):
    pages = set(reference[0])
    folder = Path(pygeo.__file__).parent
    for path in sorted(folder.iterdir()):
        name = path.stem if path.suffix == ".py" else path.name
        if name.startswith("_") or not (path.suffix == ".py" or (path / "__init__.py").is_file()):
            continue
        full = f"pygeo.{name}"
        assert full in pages or full in api.EXCLUDED_MODULES, f"public module {full} has no reference page"
    for name in pygeo.__all__:
        value = getattr(pygeo, name)
        if inspect.ismodule(value):
            assert value.__name__ in pages, f"pygeo.{name} is in pygeo.__all__ but has no reference page"


def test_a_name_added_to_all_appears_without_editing_the_docs(monkeypatch, tmp_path):
    def brand_new_function(z):
        """A name another developer has just added."""
        return z

    brand_new_function.__module__ = "pygeo.geometry"
    monkeypatch.setattr(pygeo.geometry, "brand_new_function", brand_new_function, raising=False)
    monkeypatch.setattr(pygeo.geometry, "__all__", [*pygeo.geometry.__all__, "brand_new_function"])
    assert api.has_entry(brand_new_function)
    api.write_pages(tmp_path)
    page = (tmp_path / "pygeo.geometry.rst").read_text()
    assert ".. autofunction:: brand_new_function" in page
    assert "   brand_new_function" in page  # and in the page's summary table


def test_an_object_outside_the_reference_has_no_entry():
    def not_exported(z):
        """Defined here, in no module's __all__."""

    assert not api.has_entry(not_exported)
    assert not api.has_entry(pygeo._checks)  # a private module


def test_each_object_is_documented_once(reference):
    pages, _ = reference
    seen = {}
    for page, documented in pages.items():
        for name, value in documented:
            if api._is_plain_value(value):
                continue
            assert id(value) not in seen, f"{page}.{name} is documented twice (also as {seen[id(value)]})"
            seen[id(value)] = f"{page}.{name}"
    assert "pygeo.backends" in seen.values()       # a top-level name no subpackage exports
    assert "pygeo.geometry.christoffel" in seen.values() and "pygeo.christoffel" not in seen.values()


def test_plain_text_layouts_become_literal_blocks_and_inline_markup_is_escaped():
    lines = inspect.cleandoc('''
        Summary |v|_G of u * v.

        Subclasses implement `metric(z)`:
          metric(z)   z [..., d] -> G [..., d, d]
          inner(z, u, v)  -> u^T G v

        Args:
            likelihood: which one:
                "bernoulli": the decoder returns logits
                  G = J^T diag(p (1 - p)) J
            **options: passed on, |x| * 2.
        Returns:
            G [..., d, d].
        ''').splitlines()
    out = plain.convert(lines)
    text = "\n".join(out)
    assert out[0] == r"Summary \|v\|_G of u \* v."
    literal = out.index("::")
    assert out[literal + 1] == "" and out[literal + 2] == "  metric(z)   z [..., d] -> G [..., d, d]"
    assert "  inner(z, u, v)  -> u^T G v" in out      # unescaped: literal text stays as written
    # in an entry, the first continuation line is napoleon's; what is indented deeper is literal, inside the entry
    assert '        "bernoulli": the decoder returns logits' in out
    nested = out.index("        ::")
    assert out[nested + 2] == "          G = J^T diag(p (1 - p)) J"
    assert r"    **options: passed on, \|x\| \* 2." in out   # the entry name stays for napoleon
    assert text.count("Args:") == 1 and "Returns:" in out


def test_gallery_examples_have_a_title_and_draw_a_figure():
    examples = sorted((ROOT / "examples").glob("plot_*.py"))
    assert len(examples) >= 10
    for path in examples:
        source = path.read_text()
        docstring = ast.get_docstring(ast.parse(source))
        assert docstring, f"{path.name}: sphinx-gallery needs a docstring with a title"
        title, underline = docstring.splitlines()[:2]
        assert underline == "=" * len(title), f"{path.name}: the title's underline must match its length"
        assert "plt.show()" in source, f"{path.name} draws no figure"
        assert "progress=False" in source or "progress" not in source


def test_every_results_file_is_on_the_experiments_page_and_its_figures_exist():
    # The site includes experiments/*.md as they are (docs/conf.py copies the folder): a figure linked by a path that
    # does not exist, or a results file left out of the page's toctree, is a sphinx-build -W error that only the CI's
    # last step would show.
    toctree = (ROOT / "docs" / "experiments.md").read_text()
    for results in sorted((ROOT / "experiments").glob("*.md")):
        assert f"_generated/experiments/{results.stem}\n" in toctree, f"{results.name} is not on docs/experiments.md"
        for target in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", results.read_text()):
            assert (results.parent / target).is_file(), f"{results.name} links a missing figure {target}"
