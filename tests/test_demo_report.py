"""The report's first lines: which backend ran each section, and a bold warning for a fallback to plain PyTorch."""
import pygeo
import torch
from pygeo import _backend
from pygeo.cli import demo


def test_kernels_are_recorded_by_backend_and_how_they_were_chosen():
    record = {}
    J = torch.randn(5, 4, 3)
    with demo._recording_kernels(record):
        pygeo.ops.jtj(J)  # auto
        pygeo.ops.jtj(J, backend="torch")  # requested
        torch.func.vmap(lambda j: pygeo.ops.jtj(j.unsqueeze(0)))(J)  # inside a transform: plain PyTorch
    assert _backend.call_op.__name__ == "call_op" and _backend.resolve.__name__ == "resolve", "dispatch restored"
    auto_backend = "cpp" if pygeo.backends()["cpp"].available else "torch"
    assert record == {("jtj", auto_backend, "auto"): 1, ("jtj", "torch", "requested"): 1,
                      ("jtj", "torch", "transform"): 1}


def test_bold_warning_only_for_an_automatic_fallback_without_compiled_kernels(monkeypatch):
    kernels = {"pullback": {("mlp_metric", "torch", "auto"): 3, ("jtj", "torch", "requested"): 2},
               "kahler": {("lse_kahler_metric", "cpp", "auto"): 4}, "empty": {}}
    real = pygeo.backends()

    class Report(dict):
        pass

    missing = Report(real)
    missing["cpp"] = _backend.BackendStatus("cpp", False, "pygeo._C could not be imported")
    monkeypatch.setattr(pygeo, "backends", lambda: missing)
    lines = demo.backend_lines(kernels, torch.device("cpu"))
    warnings = [line for line in lines if line.startswith("**Warning")]
    assert len(warnings) == 1 and "section pullback ran mlp_metric" in warnings[0]
    assert "pygeo._C could not be imported" in warnings[0] and warnings[0].endswith("**")
    assert lines.index(warnings[0]) < lines.index(next(line for line in lines if line.startswith("Backends by")))
    assert "- kahler: C++ kernels (lse_kahler_metric x4)" in lines and "- empty: no pygeo kernel calls" in lines
    assert any("plain PyTorch by request (baselines) (jtj x2)" in line for line in lines)

    available = Report(real)
    available["cpp"] = _backend.BackendStatus("cpp", True, "C++ kernels")
    monkeypatch.setattr(pygeo, "backends", lambda: available)
    assert not [line for line in demo.backend_lines(kernels, torch.device("cpu")) if line.startswith("**Warning")]
