"""The one dispatch point: which backend runs an op, and why another one cannot.

Backends:
  torch  - pure PyTorch reference (pygeo/reference/), always available; the fallback and the test oracle.
  cpp    - the compiled extension pygeo._C (C++/OpenMP), CPU tensors.
  cuda   - CUDA C++ kernels in pygeo._C, when it was built with nvcc, CUDA tensors.
  triton - Triton kernels (pygeo.triton_kernels), CUDA tensors; CPU tensors too when TRITON_INTERPRET=1.

backend="auto" picks, for CUDA tensors, the backend measured fastest for the op and its shapes (GPU_RULES, applied by
gpu_backend) among those available, and for CPU tensors cpp when compiled, else torch. PYGEO_BACKEND=<name> overrides "auto" everywhere. A backend that is asked for
by name but cannot run raises BackendUnavailableError saying why.
"""
from __future__ import annotations

import functools
import importlib
import os
import sys
from dataclasses import dataclass
from typing import Callable, Collection, Mapping, Optional, Sequence, Tuple, Union

import torch

BACKEND_NAMES: Tuple[str, ...] = ("torch", "cpp", "cuda", "triton")

# Tests set this to fill every kernel output with NaN before the kernel runs, so an element a kernel forgets to write
# cannot pass by accident.
POISON_OUTPUTS: bool = os.environ.get("PYGEO_POISON_OUTPUTS", "0") == "1"


class BackendUnavailableError(RuntimeError):
    """A backend was requested by name (argument or PYGEO_BACKEND) but cannot run here."""


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str  # why not, or what it is


@functools.lru_cache(maxsize=None)
def compiled_module():
    """pygeo._C, or None when the extension was not built."""
    # pygeo._C links the system's OpenMP runtime while PyTorch ships its own: two thread pools that spin while idle
    # fight over the cores. A passive wait policy for ours (read when its runtime loads) keeps it from stealing
    # PyTorch's cores between kernels; an explicit user setting wins.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        return importlib.import_module("pygeo._C")
    except ImportError:
        return None


@functools.lru_cache(maxsize=None)
def shadowed_build() -> Optional[str]:
    """Where an installed build of pygeo with its compiled extension lies, when this process imported pygeo from a
    source checkout that has none (python -m pygeo, or a script, run from the clone's root after `pip install .`: the
    current folder comes first on sys.path). None when there is no such shadowing. Looks at files only."""
    import importlib.machinery
    import importlib.metadata
    from pathlib import Path

    package = Path(__file__).resolve().parent
    if not ((package.parent / "pyproject.toml").is_file() and (package.parent / "csrc").is_dir()):
        return None  # not a source checkout
    if any((package / f"_C{suffix}").exists() for suffix in importlib.machinery.EXTENSION_SUFFIXES):
        return None  # built in place (the development setup)
    try:
        distribution = importlib.metadata.distribution("pygeo-latent")
    except importlib.metadata.PackageNotFoundError:
        return None
    if _editable_install_of(distribution, package.parent):
        return None  # `pip install -e .` of this very checkout: its finder maps pygeo._C from the build folder
    files = distribution.files or []
    for file in files:  # an editable install lists no pygeo/_C file: its finder maps the build folder instead
        if file.parts[:1] == ("pygeo",) and file.name.startswith("_C."):
            installed = Path(file.locate()).resolve().parent
            if installed != package and installed.joinpath(file.name).exists():
                return str(installed)
    return None


def _editable_install_of(distribution, checkout) -> bool:
    """True when the installed distribution is an editable install (PEP 660 direct_url.json) of the folder checkout."""
    import json
    from pathlib import Path
    from urllib.parse import unquote, urlparse

    read_text = getattr(distribution, "read_text", None)
    try:
        direct_url = json.loads((read_text and read_text("direct_url.json")) or "{}")
    except ValueError:
        return False
    if not direct_url.get("dir_info", {}).get("editable"):
        return False
    return Path(unquote(urlparse(direct_url.get("url", "")).path)).resolve() == Path(checkout).resolve()


def shadowing_warning() -> Optional[str]:
    """The warning `import pygeo` gives when shadowed_build() finds the source checkout hiding an installed build."""
    installed = shadowed_build()
    if installed is None:
        return None
    here = os.path.dirname(os.path.abspath(__file__))
    return (f"pygeo was imported from the source checkout {here}, which has no compiled extension, while the installed "
            f"build in {installed} has one: this process runs on the plain-PyTorch fallback. Run from outside the "
            f"checkout or use the `pygeo` command (`pygeo demo`), or build in place for development (README, "
            f"Development).")


@functools.lru_cache(maxsize=None)
def _compiled_import_error() -> str:
    try:
        importlib.import_module("pygeo._C")
    except ImportError as error:
        return str(error)
    return ""


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str:
    try:
        importlib.import_module("triton")
    except Exception as error:  # triton raises more than ImportError when its driver is missing
        return f"{type(error).__name__}: {error}"
    return ""


def status(name: str) -> BackendStatus:
    if name == "torch":
        return BackendStatus(name, True, "pure PyTorch reference")
    if name == "cpp":
        module = compiled_module()
        if module is None:
            shadowed = shadowed_build()
            if shadowed is not None:
                return BackendStatus(name, False, f"extension pygeo._C missing in this source checkout, which hides the "
                                                  f"installed build in {shadowed} (run from outside the checkout)")
            return BackendStatus(name, False, f"extension pygeo._C not built or not importable ({_compiled_import_error()})")
        info = module.build_info()
        return BackendStatus(name, True, f"C++ kernels, OpenMP {'on' if info['openmp'] else 'off'}, {info['max_threads']} threads")
    if name == "cuda":
        module = compiled_module()
        if module is None:
            return BackendStatus(name, False, "extension pygeo._C not built")
        if not module.build_info()["cuda"]:
            return BackendStatus(name, False, "pygeo._C was built without CUDA kernels (no nvcc at build time, or PYGEO_WITH_CUDA=OFF)")
        if not torch.cuda.is_available():
            return BackendStatus(name, False, "no CUDA device visible to PyTorch")
        return BackendStatus(name, True, f"CUDA C++ kernels on {torch.cuda.get_device_name()}")
    if name == "triton":
        error = _triton_import_error()
        if error:
            return BackendStatus(name, False, f"triton is not importable ({error})")
        if torch.cuda.is_available():
            return BackendStatus(name, True, "Triton kernels on the GPU")
        if triton_interpreting():
            return BackendStatus(name, True, "Triton interpreter on the CPU (TRITON_INTERPRET=1; slow, for tests)")
        return BackendStatus(name, False, "no CUDA device (set TRITON_INTERPRET=1 before importing pygeo to run the interpreter)")
    raise ValueError(f"unknown backend {name!r}; expected one of {BACKEND_NAMES} or 'auto'")


def check_name(backend: Optional[str]) -> None:
    """Refuse an unknown backend name where it is stored for later (a metric's backend=), not at its first use."""
    if backend not in (None, "auto") and backend not in BACKEND_NAMES:
        raise ValueError(f"backend={backend!r}: a backend must be 'auto' or one of {BACKEND_NAMES}")


class BackendReport(dict):
    """Maps backend name -> BackendStatus; prints as a table."""

    def __str__(self) -> str:
        lines = ["backend  available  detail"]
        for entry in self.values():
            lines.append(f"{entry.name:<8} {'yes' if entry.available else 'no':<10} {entry.reason}")
        return "\n".join(lines)

    __repr__ = __str__


def backends() -> BackendReport:
    """What is available here, and why not."""
    return BackendReport((name, status(name)) for name in BACKEND_NAMES)


def _runs_on(name: str, device: torch.device) -> bool:
    if name == "torch":
        return True
    if name == "cpp":
        return device.type == "cpu"
    if name == "cuda":
        return device.type == "cuda"
    if name == "triton":
        return device.type == "cuda" or (device.type == "cpu" and triton_interpreting())
    return False


Sizes = Mapping[str, Union[int, bool]]


@dataclass(frozen=True)
class GpuRule:
    """For CUDA tensors of `op` whose sizes satisfy `applies`: try `preference` in order (first available wins;
    "torch", the plain-PyTorch reference, is always available). `evidence`: the measurement behind the rule."""
    op: str
    shapes: str  # the condition in words (what `applies` tests)
    applies: Callable[[Sizes], bool]
    preference: Tuple[str, ...]
    evidence: str


_H100 = "bench/RESULTS.md, 'GPU: NVIDIA H100 80GB HBM3, 2026-11-23, float32'"

# "auto" on CUDA tensors, per op and shape range. No GPU was lent while this table was written: every rule comes from
# the H100 figures recorded in bench/RESULTS.md (float32, pytest-benchmark medians, baselines in the same run), not
# from a new measurement; sizes between two measured points take the rule of the nearer measured loss (the kernel is
# kept only where it was measured winning). Rules of one op are tried in order: the first that applies decides. An op
# with no rule that applies takes DEFAULT_GPU_PREFERENCE.
GPU_RULES: Tuple[GpuRule, ...] = (
    GpuRule("jtj", "any d", lambda s: True, ("triton", "cuda"),
            f"{_H100}: B=8192, D=784, d=2/16/64: Triton 0.225/0.631/1.768 ms, CUDA C++ 1.05/1.53/7.24 ms, einsum "
            f"0.693/1.005/3.007 ms"),
    GpuRule("mlp_metric", "any MLP", lambda s: True, ("triton", "cuda"),
            f"{_H100}: 784-512-16 MLP, B=8192: fused Triton 1.65 ms (euclidean) / 3.66 ms (bernoulli) against "
            f"vmap(jacfwd)+einsum 5.42 / 6.21 ms; the fused CUDA C++ kernel 36-240 ms"),
    GpuRule("latent_metric", "full precisions [N, d, d]", lambda s: bool(s.get("full", False)), ("torch",),
            f"{_H100}: full, N=1000, d=16, B=65536: Triton 7.76 ms against the two-GEMM torch form 3.03 ms (Triton "
            f"2.6x slower)"),
    GpuRule("latent_metric", "diagonal precisions [N, d]", lambda s: True, ("triton", "cuda"),
            f"{_H100}: diagonal, B=65536: N=1000 d=16 Triton 0.817 ms, CUDA C++ 6.19 ms, two-GEMM torch 1.79 ms; "
            f"N=10000 d=16 2.47 vs 14.9 ms; N=1000 d=2/64 1.07/2.07 vs 1.54/4.37 ms"),
    GpuRule("langevin_step", "d > 16", lambda s: s["d"] > 16, ("torch",),
            f"{_H100}: simplified, B=65536, d=64: plain torch (batched cuSOLVER) 16.3 ms, Triton 61.6 ms, CUDA C++ "
            f"52.3 ms"),
    GpuRule("langevin_step", "d <= 2, without dG", lambda s: s["d"] <= 2 and not s.get("derivative", False),
            ("cuda", "triton"),
            f"{_H100}: simplified, B=65536, d=2: CUDA C++ 0.566 ms, Triton 0.675 ms, plain torch 2.03 ms"),
    GpuRule("langevin_step", "d <= 16", lambda s: True, ("triton", "cuda"),
            f"{_H100}: B=65536, simplified d=16: Triton 1.513 ms, CUDA C++ 2.31 ms, plain torch 2.76 ms; with dG, "
            f"d=2/16: Triton 1.19/1.97 ms against plain torch 3.62/5.19 ms (CUDA C++ not timed with dG)"),
    GpuRule("lse_kahler_metric", "n <= 8", lambda s: s["n"] <= 8, ("triton", "cuda"),
            f"{_H100}: n=8, K=256, B=16384, full: Triton 1.96 ms, CUDA C++ 15.6 ms, closed form (torch) 2.74 ms"),
    GpuRule("lse_kahler_metric", "n > 8", lambda s: True, ("torch",),
            f"{_H100}: n=32, K=1024, B=16384, full: closed form (torch) 30.7 ms, Triton 163 ms (5x slower), CUDA "
            f"C++ 305 ms; n between 9 and 31 not measured"),
    GpuRule("christoffel", "any d", lambda s: True, ("triton", "cuda"),
            f"{_H100}: not timed per backend; the Christoffel symbols of a softplus-MLP PullbackMetric (float64, "
            f"B=256/4096) take 3.82/11.1 ms with Triton inside against 9.84/53.6 ms for nested jacfwd"),
)

DEFAULT_GPU_PREFERENCE: Tuple[str, ...] = ("triton", "cuda")


def gpu_rule(op: str, sizes: Optional[Sizes] = None) -> Optional[GpuRule]:
    """The rule of GPU_RULES that decides `op` at these sizes, or None (no rule: DEFAULT_GPU_PREFERENCE)."""
    sizes = sizes or {}
    for rule in GPU_RULES:
        if rule.op == op:
            try:
                if rule.applies(sizes):
                    return rule
            except KeyError as missing:
                raise ValueError(f"GPU rule for op {op!r} ({rule.shapes}) needs size {missing} in sizes, got "
                                 f"{dict(sizes)}") from None
    return None


def gpu_backend(op: str, sizes: Optional[Sizes], available: Collection[str]) -> str:
    """The backend "auto" runs for CUDA tensors of `op` with these sizes (e.g. {"d": 16, "derivative": True}), given
    the backends that are implemented and available: the first of its rule's preference in `available`, else torch.
    A pure function of its arguments (no device query), so that the rules can be tested without a GPU."""
    rule = gpu_rule(op, sizes)
    for name in rule.preference if rule is not None else DEFAULT_GPU_PREFERENCE:
        if name == "torch" or name in available:
            return name
    return "torch"


def _mark_constant(function):
    """torch.compile treats function's result as a constant of the traced graph (torch._dynamo.assume_constant_result).
    Importing torch._dynamo costs about as much as importing torch itself; when it is not loaded yet, set the mark it
    would set (tests/test_backend.py checks that the decorator still sets exactly this)."""
    if "torch._dynamo" in sys.modules:
        return torch._dynamo.assume_constant_result(function)
    function._dynamo_marked_constant = True
    return function


# Under torch.compile the choice is made once at trace time and baked into the graph as a constant.
@_mark_constant
def resolve(op: str, device: torch.device, backend: Optional[str], implemented: Sequence[str],
            sizes: Optional[Sizes] = None) -> str:
    """Turn backend='auto' (or None) into a concrete backend for `op` on `device`, or raise saying why not.

    implemented: the backends this op has; sizes: the shapes GPU_RULES distinguish for this op (see gpu_backend).
    """
    explicit = backend not in (None, "auto")
    requested = backend if explicit else (os.environ.get("PYGEO_BACKEND") or "auto")  # empty = unset
    source = f"backend={requested!r}" if explicit else f"PYGEO_BACKEND={requested!r} (environment variable)"
    if requested == "auto":
        if device.type == "cuda":
            available = [name for name in implemented if name != "torch" and status(name).available]
            return gpu_backend(op, sizes, available)
        if "cpp" in implemented and status("cpp").available:
            return "cpp"
        return "torch"
    if requested not in BACKEND_NAMES:
        raise ValueError(f"{source}: a backend must be 'auto' or one of {BACKEND_NAMES}")
    if requested not in implemented:
        raise BackendUnavailableError(f"{source}: op {op!r} has no {requested!r} backend; it has {tuple(implemented)}")
    entry = status(requested)
    if not entry.available:
        raise BackendUnavailableError(f"{source}: backend {requested!r} for op {op!r} is unavailable: {entry.reason}")
    if not _runs_on(requested, device):
        raise BackendUnavailableError(f"{source}: backend {requested!r} for op {op!r} cannot run on {device.type} tensors")
    return requested


def empty(shape, like: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Output buffer for a kernel: uninitialised, or NaN-filled when POISON_OUTPUTS is set (tests)."""
    if POISON_OUTPUTS:
        return torch.full(tuple(shape), float("nan"), dtype=dtype or like.dtype, device=like.device)
    return torch.empty(tuple(shape), dtype=dtype or like.dtype, device=like.device)


def dtype_name(tensor: torch.Tensor) -> str:
    """The name the compiled kernels dispatch on."""
    if tensor.dtype == torch.float32:
        return "float32"
    if tensor.dtype == torch.float64:
        return "float64"
    raise TypeError(f"compiled kernels take float32 or float64, got {tensor.dtype}")


def ptr(tensor: Optional[torch.Tensor]) -> int:
    """Data pointer for the compiled kernels (0 for an absent optional tensor)."""
    return 0 if tensor is None else tensor.data_ptr()


def cuda_stream(tensor: torch.Tensor) -> int:
    return torch.cuda.current_stream(tensor.device).cuda_stream


def run_compiled(kernel: str, backend: str, args: tuple, like: torch.Tensor) -> None:
    """Call pygeo._C's `<kernel>_cpu(*args)` for backend "cpp", or `<kernel>_cuda(*args, stream)` for "cuda" on the
    current stream of like's device: the one place where an op hands its pointers to the compiled kernels."""
    C = compiled_module()
    if backend == "cpp":
        getattr(C, f"{kernel}_cpu")(*args)
    else:
        getattr(C, f"{kernel}_cuda")(*args, cuda_stream(like))


def call_op(op, implementation, *args):
    """op(*args), the torch.library custom op, or implementation(*args) (the function the op wraps) for a plain eager
    call that autograd will not record. The dispatcher's Python overhead (about 70 us a call on a 2-core CPU) dominates
    the small batches that samplers evaluate thousands of times; it only earns its keep under torch.compile, fake
    tensors and autograd. args[0] is the batch tensor, args[-1] the backend name.

    Inside torch.func transforms (grad, jacrev, jacfwd, jvp, vmap) and under forward-mode AD the op is bypassed for
    implementation(..., "torch"), plain differentiable PyTorch: a custom op has no forward-mode formula (its tangents
    would silently come out as zeros) and functorch's reverse transforms refuse it."""
    from . import _checks

    tensors = [a for a in args if isinstance(a, torch.Tensor)] + [
        t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
    if any(under_function_transform(t) for t in tensors):
        return implementation(*args[:-1], "torch")
    if _checks._is_fake(args[0]):
        return op(*args)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return op(*args)
    return implementation(*args)


def under_function_transform(tensor: torch.Tensor) -> bool:
    """True when tensor is wrapped by a torch.func transform or carries a forward-mode tangent (never while
    torch.compile traces: dynamo cannot trace the functorch query, and its graphs hold no such tensors)."""
    if torch.compiler.is_compiling():
        return False
    if torch._C._functorch.is_functorch_wrapped_tensor(tensor):
        return True
    # unpack_dual costs a few microseconds: ask only while a forward-mode dual level is open.
    return (getattr(torch.autograd.forward_ad, "_current_level", 0) >= 0
            and torch.autograd.forward_ad.unpack_dual(tensor).tangent is not None)


def vjp_where_needed(fn, primals: Sequence, needed: Sequence[bool], cotangent: torch.Tensor) -> list:
    """The vector-Jacobian product of fn(*primals) with cotangent, for the primals whose `needed` flag is set (None
    for the others): the backward of an op recomputed through its differentiable plain-PyTorch form. Only what needs
    a gradient is differentiated (a frozen decoder's weights cost nothing); a primal may be a list of tensors. It
    runs on every device and can be differentiated again (create_graph)."""
    wanted = [i for i, need in enumerate(needed) if need and primals[i] is not None]

    def with_differentiated(*differentiated):
        args = list(primals)
        for i, value in zip(wanted, differentiated):
            args[i] = value
        return fn(*args)

    grads = [None] * len(primals)
    if wanted:
        _, vjp = torch.func.vjp(with_differentiated, *(primals[i] for i in wanted))
        for i, grad in zip(wanted, vjp(cotangent)):
            grads[i] = grad
    return grads
