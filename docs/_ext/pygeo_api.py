"""The API reference, generated from the package at build time.

Every public module of pygeo gets one page listing the names of its ``__all__`` (a module without ``__all__``: the
public names it defines itself), so a name added to a module's ``__all__`` appears in the reference without editing the
docs, and a new public subpackage (a module ``pygeo.X`` without a leading underscore) gets its own page.
``tests/test_docs.py`` imports this file (no Sphinx needed) to check that every public name of DESIGN.md that exists in
the package has an entry.
"""
import importlib
import inspect
import pkgutil
from pathlib import Path
from typing import Dict, List, Tuple

# Not in the reference: the command line (its own page, docs/cli.rst), the pure-PyTorch oracles behind the ops, the
# Triton kernels (launchers behind the ops' backend="triton") and the compiled module.
EXCLUDED_MODULES = {"pygeo.cli", "pygeo.reference", "pygeo.triton_kernels", "pygeo._C", "pygeo.__main__"}


def public_modules() -> List[str]:
    """pygeo's public subpackages and modules (one level down), sorted: the pages of the reference."""
    import pygeo

    # The package's own folder only: an editable install adds other entries to pygeo.__path__.
    folder = str(Path(pygeo.__file__).parent)
    names = {f"pygeo.{info.name}" for info in pkgutil.iter_modules([folder]) if not info.name.startswith("_")}
    names |= {f"pygeo.{name}" for name in getattr(pygeo, "__all__", ()) if inspect.ismodule(getattr(pygeo, name, None))}
    return sorted(names - EXCLUDED_MODULES)


def module_names(module) -> List[str]:
    """The public names of a module: its __all__, else what it defines itself without a leading underscore."""
    if hasattr(module, "__all__"):
        return [name for name in module.__all__ if hasattr(module, name)]
    return [name for name, value in vars(module).items()
            if not name.startswith("_") and getattr(value, "__module__", None) == module.__name__
            and (inspect.isclass(value) or inspect.isfunction(value))]


def entries() -> Tuple[Dict[str, List[Tuple[str, object]]], Dict[int, str]]:
    """(page -> [(name, object)] documented on it, id(object) -> the dotted name of its entry).

    An object exported by several modules is documented once, on the first page that lists it; the top-level page
    ``pygeo`` documents only what no submodule page has (``pygeo.backends``...) and links to the rest.
    """
    pages: Dict[str, List[Tuple[str, object]]] = {}
    entry_of: Dict[int, str] = {}
    for module_name in public_modules():
        module = importlib.import_module(module_name)
        pages[module_name] = []
        for name in module_names(module):
            value = getattr(module, name)
            if inspect.ismodule(value):
                continue
            if id(value) in entry_of and not _is_plain_value(value):
                continue
            entry_of.setdefault(id(value), f"{module_name}.{name}")
            pages[module_name].append((name, value))
    import pygeo

    pages["pygeo"] = [(name, getattr(pygeo, name)) for name in module_names(pygeo)
                      if not inspect.ismodule(getattr(pygeo, name)) and id(getattr(pygeo, name)) not in entry_of]
    for name, value in pages["pygeo"]:
        entry_of[id(value)] = f"pygeo.{name}"
    return pages, entry_of


def _is_plain_value(value) -> bool:  # numbers, strings, tuples: id() is shared by equal constants, not one object
    return not (inspect.isclass(value) or inspect.isfunction(value) or callable(value))


def has_entry(obj) -> bool:
    """True if the reference documents obj: a name on a page, or a documented member of a class on a page."""
    _, entry_of = entries()
    if id(obj) in entry_of:
        return True
    owner = getattr(obj, "__self__", None)  # a classmethod bound to its class
    if inspect.isclass(owner) and id(owner) in entry_of:
        return bool(inspect.getdoc(obj))
    qualname = getattr(obj, "__qualname__", "")
    module = inspect.getmodule(obj)
    if "." in qualname and module is not None:
        owner = module
        for part in qualname.split(".")[:-1]:
            owner = getattr(owner, part, None)
        return inspect.isclass(owner) and id(owner) in entry_of and bool(inspect.getdoc(obj))
    if isinstance(obj, property):
        return bool(obj.__doc__)
    return False


def _directive(name: str, value) -> str:
    if inspect.isclass(value):
        if issubclass(value, BaseException):
            return f".. autoexception:: {name}\n"
        # undoc-members: the fields of the result classes (HMCResult.samples, ...) have annotations, not docstrings
        return f".. autoclass:: {name}\n   :members:\n   :undoc-members:\n   :show-inheritance:\n"
    if inspect.isfunction(value) or inspect.isbuiltin(value) or callable(value):
        return f".. autofunction:: {name}\n"
    return f".. autodata:: {name}\n   :annotation:\n"


def page_text(module_name: str, documented: List[Tuple[str, object]], entry_of: Dict[int, str]) -> str:
    module = importlib.import_module(module_name)
    lines = [module_name, "=" * len(module_name), "", f".. automodule:: {module_name}", "   :no-members:", "",
             f".. currentmodule:: {module_name}", ""]
    elsewhere = [(name, entry_of[id(getattr(module, name))]) for name in module_names(module)
                 if not inspect.ismodule(getattr(module, name)) and id(getattr(module, name)) in entry_of
                 and entry_of[id(getattr(module, name))] != f"{module_name}.{name}"
                 and not _is_plain_value(getattr(module, name))]
    if documented:
        lines += [".. autosummary::", "   :nosignatures:", ""] + [f"   {name}" for name, _ in documented] + [""]
    if elsewhere:
        lines += [f"Also importable from ``{module_name}`` (documented where they are defined):", ""]
        lines += [f"- ``{module_name}.{name}``: :py:obj:`{target}`" for name, target in elsewhere] + [""]
    if module_name == "pygeo":
        submodules = [name for name in module_names(module) if inspect.ismodule(getattr(module, name))]
        lines += ["Subpackages, each an attribute after ``import pygeo``: "
                  + ", ".join(f":py:mod:`pygeo.{name}`" for name in submodules) + ".", ""]
    for name, value in documented:
        lines += [_directive(name, value)]
    return "\n".join(lines) + "\n"


def write_pages(out_dir: Path) -> List[str]:
    """Writes one page per module into out_dir (and index.rst); returns the module names, top-level first."""
    pages, entry_of = entries()
    out_dir.mkdir(parents=True, exist_ok=True)
    order = ["pygeo"] + [name for name in pages if name != "pygeo"]
    for module_name in order:
        text = page_text(module_name, pages[module_name], entry_of)
        path = out_dir / f"{module_name}.rst"
        if not path.exists() or path.read_text() != text:  # unchanged pages keep their time stamp: no rebuild
            path.write_text(text)
    index = ["API reference", "=============", "",
             "Generated from the docstrings: one page per public module, listing its ``__all__``. Shapes are written",
             "``z [B, d]``; ``...`` stands for any batch dimensions.", "",
             ".. toctree::", "   :maxdepth: 1", ""] + [f"   {name}" for name in order] + [""]
    index_text = "\n".join(index)
    index_path = out_dir / "index.rst"
    if not index_path.exists() or index_path.read_text() != index_text:
        index_path.write_text(index_text)
    for stale in out_dir.glob("pygeo*.rst"):
        if stale.stem not in order:
            stale.unlink()
    return order


def setup(app):
    def generate(app):
        write_pages(Path(app.srcdir) / "api")

    app.connect("builder-inited", generate)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
