"""pygeo: fast, exact differential geometry for the latent spaces of generative models.

Public names (DESIGN.md, "Public names"); everything else lives in submodules. The subpackages are attributes of the
package (pygeo.models, pygeo.sample, ...), imported on first use (PEP 562) so that `import pygeo` costs little more
than `import torch`.
"""
import importlib as _importlib
import importlib.util as _importlib_util
import warnings as _warnings

from . import _backend
from ._backend import BackendUnavailableError, backends
from .geometry import christoffel, curvature, exp_map, geodesic, geodesic_distances, sectional_curvature
from .geometry import log_map, parallel_transport
from .metrics import ComplexGaussianFisherMetric, FunctionMetric, LatentMetric, LSEKahlerMetric, Metric, PullbackMetric

__version__ = "0.1.0"

# The public subpackages of DESIGN.md. ops, metrics and geometry are loaded by the names above; the others on first
# attribute access. A name whose module does not exist (yet) raises AttributeError like any missing attribute.
_SUBPACKAGES = ("models", "data", "cluster", "regularizers", "metrics", "geometry", "sample", "ops", "optim",
                "diagnostics", "evaluate", "statistics")


def _subpackage_exists(name: str) -> bool:
    return _importlib_util.find_spec(f"{__name__}.{name}") is not None


def __getattr__(name: str):
    if name in _SUBPACKAGES:
        try:
            module = _importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise  # the subpackage exists but needs a module that is missing: say which
            raise AttributeError(f"module {__name__!r} has no attribute {name!r} (no module {__name__}.{name} in "
                                 f"this version)") from None
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | {name for name in _SUBPACKAGES if _subpackage_exists(name)})


# `pip install .` then `python -m pygeo` from the clone's root imports this source folder, not the build: say so.
if _backend.shadowing_warning():
    _warnings.warn(_backend.shadowing_warning(), RuntimeWarning, stacklevel=2)

__all__ = [
    *(name for name in _SUBPACKAGES if _subpackage_exists(name)), "backends", "BackendUnavailableError",
    "Metric", "FunctionMetric", "PullbackMetric", "LatentMetric", "LSEKahlerMetric", "ComplexGaussianFisherMetric",
    "christoffel", "curvature", "sectional_curvature", "geodesic", "exp_map", "geodesic_distances",
    "log_map", "parallel_transport",
]
