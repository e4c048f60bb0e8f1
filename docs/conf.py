"""Sphinx configuration of pygeo's documentation site.

Build (from the clone's root, after ``pip install ".[docs]"``): ``sphinx-build -W -b html docs docs/_build/html``.
The API reference (docs/_ext/pygeo_api.py), the copies of the benchmark and experiment results and the changelog are
generated at build time; the gallery (examples/) is executed by sphinx-gallery.
"""
import os
import shutil
import socket
import subprocess
import sys
import urllib.parse
from pathlib import Path

DOCS = Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(DOCS / "_ext"))

# The docs document the installed pygeo (its C++ kernels), never the source folder, which has no compiled extension.
import pygeo  # noqa: E402

project = "pygeo"
author = "the pygeo developers"
copyright = "2026, the pygeo developers"
version = release = pygeo.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",       # the docstrings are Google style ("Args:", "Returns:", "Raises:")
    "sphinx.ext.intersphinx",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "myst_parser",               # docs/MATH.md and the results files are Markdown
    "sphinx_gallery.gen_gallery",
    "pygeo_api",                 # the API reference pages, one per public module
    "plain_docstrings",          # the plain-text parts of the docstrings, made safe for reStructuredText
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
# The benchmark results and the changelog are included into performance.md / changelog.md, not pages of their own.
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "_generated/bench/*", "_generated/changelog.md", "auto_examples/*.ipynb", "auto_examples/*.py",
                    "auto_examples/*.zip", "auto_examples/*.json", "auto_examples/*.md5"]
templates_path = []
default_role = "code"        # `name` in a docstring is code

# --- autodoc / napoleon ---------------------------------------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "signature"     # the docstrings' "Args:" say what each argument is; hints stay in the signature
autodoc_preserve_defaults = True
autodoc_inherit_docstrings = False  # a forward() without a docstring does not show nn.Module.forward's
autosummary_generate = False        # pygeo_api writes the pages; autosummary only draws their tables
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_preprocess_types = False
napoleon_attr_annotations = True

# --- MyST -----------------------------------------------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "deflist"]
myst_heading_anchors = 3

# --- intersphinx: PyTorch and NumPy, only when their inventories can be reached -------------------------------------
# CI and the developers' machines reach the package registries and nothing else: an unreachable inventory would be a
# warning, which -W turns into an error. Probe each host quickly and leave out what does not answer (the links to
# torch.Tensor etc. then render as plain text). PYGEO_DOCS_INTERSPHINX=0 skips the probe, =1 forces the mappings.
_INVENTORIES = {
    "torch": "https://docs.pytorch.org/docs/stable/",
    "numpy": "https://numpy.org/doc/stable/",
    "python": "https://docs.python.org/3/",
}


def _reachable(url: str, timeout: float = 2.0) -> bool:
    host = urllib.parse.urlparse(url).hostname
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


_intersphinx = os.environ.get("PYGEO_DOCS_INTERSPHINX", "auto")
intersphinx_mapping = {name: (url, None) for name, url in _INVENTORIES.items()
                       if _intersphinx == "1" or (_intersphinx == "auto" and _reachable(url))}
intersphinx_timeout = 5

# --- sphinx-gallery -------------------------------------------------------------------------------------------------
# Every example runs at build time; one that raises fails the build (abort_on_example_error + -W).
sphinx_gallery_conf = {
    "examples_dirs": str(ROOT / "examples"),
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"/plot_",
    "abort_on_example_error": True,
    "only_warn_on_example_error": False,
    "download_all_examples": False,
    "remove_config_comments": True,
    "within_subsection_order": "FileNameSortKey",
    "reset_modules": ("matplotlib",),
    "show_memory": False,
}

# --- theme ----------------------------------------------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"pygeo {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version"],
}
html_static_path = []
html_show_sourcelink = False

# --- pages generated from the repository ----------------------------------------------------------------------------
GENERATED = DOCS / "_generated"


def _copy_if_changed(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists() or target.read_bytes() != source.read_bytes():
        shutil.copyfile(source, target)


def _write_if_changed(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _results_copies() -> None:
    """bench/RESULTS.md and experiments/ (reports and their figures) as pages: included, not rewritten by hand."""
    _copy_if_changed(ROOT / "bench" / "RESULTS.md", GENERATED / "bench" / "RESULTS.md")
    for source in sorted((ROOT / "experiments").rglob("*")):
        if source.is_file() and source.suffix in (".md", ".png"):
            _copy_if_changed(source, GENERATED / "experiments" / source.relative_to(ROOT / "experiments"))


def _changelog() -> None:
    """The commit subjects of the checkout, newest day first (a source tree without .git says so)."""
    lines = ["# Changelog", "", "Generated from `git log` when the site is built: the subject of every commit, newest first,",
             "grouped by day.", ""]
    try:
        log = subprocess.run(["git", "-C", str(ROOT), "log", "--no-merges", "--date=short", "--format=%ad%x09%h%x09%s"],
                             capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        log = ""
    if not log.strip():
        lines += ["This copy of the sources has no git history."]
    day = None
    for entry in log.splitlines():
        date, commit, subject = entry.split("\t", 2)
        if date != day:
            lines += ["", f"## {date}", ""]
            day = date
        subject = subject.replace("*", "\\*").replace("<", "\\<").replace("_", "\\_").replace("`", "\\`")
        lines.append(f"- {subject} (`{commit}`)")
    _write_if_changed(GENERATED / "changelog.md", "\n".join(lines) + "\n")


def _command_line_help() -> None:
    """The --help of `pygeo` and of each of its commands, for cli.rst."""
    import argparse

    from pygeo.cli import build_parser

    os.environ["COLUMNS"] = "100"  # argparse wraps to the terminal: fixed, so the page does not depend on it
    parser = build_parser()
    parts = ["$ pygeo --help", parser.format_help()]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, command in action.choices.items():
                parts += [f"$ pygeo {name} --help", command.format_help()]
    _write_if_changed(GENERATED / "cli.txt", "\n".join(parts))


_results_copies()
_changelog()
_command_line_help()
