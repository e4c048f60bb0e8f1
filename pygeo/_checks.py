"""Input validation shared by every public op: errors that name the argument and say what was expected."""
from __future__ import annotations

import numbers
from typing import Callable, Optional, Sequence

import torch


def verify_once(value: torch.Tensor, what: str, check: Callable[[], None]) -> None:
    """Run `check` (which raises on bad values) unless it already passed on this tensor object at its current version.

    For model parameters (weights, centroids, precisions) that every call re-validates: scanning them costs a reduction
    and a host-device synchronisation each time, which on the GPU can take longer than the kernel. In-place changes
    (optimizer steps, load_state_dict, copy_) bump the tensor's version counter and bring the check back; writes through
    `.data` are not tracked by the counter and are not re-checked."""
    if _is_fake(value):
        return
    try:
        version = value._version
    except RuntimeError:  # inference tensors have no version counter: check every time
        check()
        return
    # The record names this tensor object too: copy.deepcopy and torch.load copy a tensor's attributes onto a new object
    # whose counter restarts, so a bare version could vouch for data it never saw.
    stamp = (id(value), version)
    passed = getattr(value, "_pygeo_verified", None)
    if passed is not None and passed.get(what) == stamp:
        return
    check()
    try:
        value._pygeo_verified = {**(passed or {}), what: stamp}
    except (AttributeError, RuntimeError):  # tensors that take no attributes are checked every time
        pass


def number(name: str, value) -> float:
    """A real scalar given as a Python or NumPy number or a 0-d real tensor, as a float (range checks are the caller's)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_complex() and value.dtype != torch.bool:
        return float(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    return float(value)


def positive_parameter(name: str, value: torch.Tensor) -> None:
    """Every entry of the parameter `value` is > 0 (ValueError naming it and its minimum otherwise), scanned once per
    version of the tensor (see verify_once)."""
    def check():
        if value.numel() and not bool((value > 0).all()):
            raise ValueError(f"{name} must be positive, got a minimum of {float(value.min()):.3g}")
    verify_once(value, "positive", check)


def real_tensor(name: str, value, min_dim: int = 0, check_finite: bool = True, parameter: bool = False) -> torch.Tensor:
    """A real floating tensor (float32 or float64) with at least `min_dim` dimensions and, by default, no NaN/Inf.
    parameter=True: the NaN/Inf scan runs once per version of the tensor (see verify_once)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.is_complex() or not value.is_floating_point():
        raise TypeError(f"{name} must be a real floating tensor (float32 or float64), got dtype {value.dtype}")
    if value.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 or float64, got {value.dtype} (convert with .float() or .double())")
    if value.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimensions, got shape {tuple(value.shape)}")
    if check_finite and value.numel() and not _is_fake(value):
        _scan(name, value, parameter)
    return value


def all_finite(value: torch.Tensor) -> bool:
    """No NaN or Inf in value (non-empty). For real tensors one min/max reduction (NaN propagates through both), about
    ten times faster on the CPU than torch.isfinite(value).all(), which writes a boolean tensor the size of value."""
    if value.is_complex():
        return bool(torch.isfinite(value).all())
    low, high = torch.aminmax(value)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def finite_rows(value: torch.Tensor) -> torch.Tensor:
    """[B] bool: row b of value [B, ...] holds no NaN or Inf.

    A row sum is finite iff its entries are, unless it overflows: rows whose sum is not finite are settled by a min/max
    reduction (NaN propagates through both). On the CPU the sum is ten times faster than
    torch.isfinite(value).flatten(1).all(-1) on dG-sized rows, and the second pass only runs when a row is suspect."""
    if value.is_complex():
        value = torch.view_as_real(value)
    if value.shape[0] == 0 or value[0].numel() == 0:
        return torch.ones(value.shape[:1], dtype=torch.bool, device=value.device)
    rows = value.reshape(value.shape[0], -1)
    finite = torch.isfinite(rows.sum(-1))
    if not bool(finite.all()):
        suspect = ~finite
        low, high = torch.aminmax(rows[suspect], dim=-1)
        finite[suspect] = torch.isfinite(low) & torch.isfinite(high)
    return finite


def _scan(name: str, value: torch.Tensor, parameter: bool) -> None:
    def check():
        if not all_finite(value):
            raise ValueError(f"{name} contains NaN or Inf values")
    if parameter:
        verify_once(value, "finite", check)
    else:
        check()


def complex_tensor(name: str, value, min_dim: int = 0, check_finite: bool = True, parameter: bool = False) -> torch.Tensor:
    """A complex tensor (complex64 or complex128); parameter=True as in real_tensor."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dtype not in (torch.complex64, torch.complex128):
        raise TypeError(f"{name} must be a complex tensor (complex64 or complex128), got dtype {value.dtype}")
    if value.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimensions, got shape {tuple(value.shape)}")
    if check_finite and value.numel() and not _is_fake(value):
        _scan(name, value, parameter)
    return value


def finite_result(result: torch.Tensor, what: str, cause: str) -> None:
    """Refuse a non-finite op result, blaming the inputs: checking the (small) output is far cheaper than scanning
    large inputs, and NaN/Inf inputs propagate into it. Skipped while tracing (torch.compile, torch.func)."""
    if result.numel() and not _is_fake(result) and not all_finite(result):
        raise ValueError(f"{cause}: {what} is not finite")


def finite_points(result: torch.Tensor, what: str, cause: str) -> None:
    """Refuse a result [B, ...] with NaN/Inf rows, saying how many of the B points and the first one: "what is not
    finite at 3 of 1024 points (first: index 17): cause". For results computed from inputs already checked finite, so
    that a non-finite value is the op's own overflow, never passed on silently. Skipped while tracing."""
    if not result.numel() or _is_fake(result):
        return
    rows = result.reshape(1, -1) if result.dim() == 0 else result
    finite = finite_rows(rows)
    if bool(finite.all()):
        return
    bad = (~finite).nonzero().flatten()
    raise ValueError(f"{what} is not finite at {bad.numel()} of {rows.shape[0]} points (first: index {int(bad[0])}): "
                     f"{cause}")


def _shared_attribute(attribute: str, error: type, what: str, tensors: dict):
    """The one value of `attribute` that all given tensors (None skipped) share; `error` naming each one if not."""
    present = {name: t for name, t in tensors.items() if t is not None}
    values = {getattr(t, attribute) for t in present.values()}
    if len(values) > 1:
        listing = ", ".join(f"{name} {what} {getattr(t, attribute)}" for name, t in present.items())
        raise error(f"all tensors must have the same {attribute}, got {listing}")
    return next(iter(values))


def same_device(**tensors: Optional[torch.Tensor]) -> torch.device:
    """All given tensors (None skipped) live on one device; returns it."""
    return _shared_attribute("device", ValueError, "on", tensors)


def same_dtype(**tensors: Optional[torch.Tensor]) -> torch.dtype:
    """All given tensors (None skipped) have one dtype; returns it."""
    return _shared_attribute("dtype", TypeError, "is", tensors)


def last_dims(name: str, value: torch.Tensor, expected: Sequence[Optional[int]], what: str) -> None:
    """The trailing dimensions of `value` equal `expected` (None = any); `what` names them, e.g. '[..., d, d]'."""
    got = tuple(value.shape[value.dim() - len(expected):]) if value.dim() >= len(expected) else None
    if got is None or any(e is not None and g != e for g, e in zip(got, expected)):
        raise ValueError(f"{name} must have shape {what} with {_describe(expected)}, got {tuple(value.shape)}")


def _describe(expected: Sequence[Optional[int]]) -> str:
    return "trailing dims (" + ", ".join("*" if e is None else str(e) for e in expected) + ")"


try:
    from torch._subclasses.fake_tensor import is_fake as _torch_is_fake
except ImportError:  # pragma: no cover
    _torch_is_fake = None


def _is_fake(value: torch.Tensor) -> bool:
    """True while tracing (torch.compile), inside torch.func transforms (vmap, jvp) or for fake/meta tensors: values
    that cannot be inspected on the host."""
    if torch.compiler.is_compiling() or value.device.type == "meta":
        return True
    if torch._C._functorch.is_functorch_wrapped_tensor(value):
        return True
    if type(value) is torch.Tensor or type(value) is torch.nn.Parameter:  # no subclass: fake only if functionalized
        return torch._is_functional_tensor(value)
    return _torch_is_fake is not None and _torch_is_fake(value)
