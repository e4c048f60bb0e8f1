import os
import subprocess
import sys

import pytest
import torch

import pygeo
from pygeo import _backend


def test_backends_report_names_every_backend_with_a_reason():
    report = pygeo.backends()
    assert set(report) == set(_backend.BACKEND_NAMES)
    assert report["torch"].available
    for entry in report.values():
        assert entry.reason, f"backend {entry.name} gives no reason"
    text = str(report)
    for name in _backend.BACKEND_NAMES:
        assert name in text


def test_auto_prefers_cpp_on_cpu_when_built():
    expected = "cpp" if _backend.status("cpp").available else "torch"
    assert _backend.resolve("jtj", torch.device("cpu"), "auto", ("torch", "cpp", "cuda", "triton")) == expected


def test_auto_falls_back_to_torch_for_ops_without_a_cpu_kernel():
    assert _backend.resolve("op", torch.device("cpu"), "auto", ("torch", "triton")) == "torch"


def test_unknown_backend_name_is_refused():
    with pytest.raises(ValueError, match="backend must be 'auto' or one of"):
        _backend.resolve("jtj", torch.device("cpu"), "fast", ("torch",))


def test_backend_the_op_lacks_is_refused_with_reason():
    with pytest.raises(pygeo.BackendUnavailableError, match="has no 'cuda' backend"):
        _backend.resolve("op", torch.device("cpu"), "cuda", ("torch", "cpp"))


def test_env_override_is_honoured_and_checked():
    code = (
        "import torch, pygeo\n"
        "J = torch.randn(3, 5, 2)\n"
        "try:\n"
        "    pygeo.ops.jtj(J)\n"
        "except pygeo.BackendUnavailableError as e:\n"
        "    print('refused:', e)\n"
        "else:\n"
        "    print('ran')\n"
    )
    env = dict(os.environ, PYGEO_BACKEND="torch")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert "ran" in out
    if not torch.cuda.is_available():
        env = dict(os.environ, PYGEO_BACKEND="cuda")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
        assert "refused:" in out and "cuda" in out


def test_import_never_fails_without_the_extension():
    # Hide pygeo._C: import pygeo must still work and report why cpp is unavailable.
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'pygeo._C':\n"
        "            raise ImportError('hidden for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import torch, pygeo\n"
        "r = pygeo.backends()\n"
        "assert not r['cpp'].available and 'not built' in r['cpp'].reason, r['cpp']\n"
        "print(pygeo.ops.jtj(torch.randn(2, 4, 3)).shape)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "torch.Size([2, 3, 3])" in out.stdout


def test_compiled_core_reports_its_build():
    module = _backend.compiled_module()
    if module is None:
        pytest.skip("pygeo._C is not built in this install (pure-PyTorch fallback): there is no compiled kernel to check")
    info = module.build_info()
    assert set(info) >= {"openmp", "cuda", "max_threads"}


def test_kernel_rechecks_sizes_and_raises_instead_of_crashing():
    module = _backend.compiled_module()
    if module is None:
        pytest.skip("pygeo._C is not built in this install (pure-PyTorch fallback): there is no compiled kernel to check")
    G = torch.empty(1, 2, 2)
    with pytest.raises(ValueError, match="d must be positive"):
        module.jtj_cpu(0, 0, 0, G.data_ptr(), 1, 3, 0, "float32")
    with pytest.raises(ValueError, match="dtype must be float32 or float64"):
        module.jtj_cpu(0, 0, 0, G.data_ptr(), 1, 3, 2, "int32")


def test_call_op_skips_the_dispatcher_only_where_nothing_needs_it():
    """Plain eager calls without autograd run the op's implementation directly; autograd and fake tensors go through the
    custom op (its autograd formula and fake implementation); torch.func transforms and forward-mode AD run the
    implementation's plain-PyTorch ("torch") backend, which they can differentiate."""
    calls = []

    def op(x, weights, backend):
        calls.append("op")
        return x * 2

    def implementation(x, weights, backend):
        calls.append(f"implementation:{backend}")
        return x * 2

    x, w = torch.randn(3), torch.randn(3)
    _backend.call_op(op, implementation, x, [w], "cpp")
    with torch.no_grad():
        _backend.call_op(op, implementation, x.requires_grad_(), [w], "cpp")
    _backend.call_op(op, implementation, x, [w], "cpp")  # x needs a gradient
    _backend.call_op(op, implementation, x.detach(), [w.requires_grad_()], "cpp")  # so does a parameter in a list
    torch.func.vmap(lambda row: _backend.call_op(op, implementation, row, [w.detach()], "cpp"))(torch.randn(2, 3))
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        _backend.call_op(op, implementation, torch.empty(3), [torch.empty(3)], "cpp")
    with torch.autograd.forward_ad.dual_level():
        _backend.call_op(op, implementation, torch.autograd.forward_ad.make_dual(x.detach(), x.detach()), [w.detach()], "cpp")
    assert calls == ["implementation:cpp", "implementation:cpp", "op", "op", "implementation:torch", "op",
                     "implementation:torch"]


# ---- "auto" on CUDA tensors: the rule table (issue 24 item 6). The rules are a pure function of op, sizes and what is
# available, so they are tested here without a GPU.

ALL_GPU = ("cuda", "triton")


@pytest.mark.parametrize("op, sizes, expected", [
    ("jtj", {"d": 2}, "triton"), ("jtj", {"d": 64}, "triton"),
    ("mlp_metric", {}, "triton"),
    ("latent_metric", {"d": 16, "N": 1000, "full": False}, "triton"),
    ("latent_metric", {"d": 16, "N": 1000, "full": True}, "torch"),  # Triton 2.6x slower than two GEMMs
    ("langevin_step", {"d": 2, "derivative": False}, "cuda"),  # CUDA C++ 0.566 ms, Triton 0.675 ms
    ("langevin_step", {"d": 2, "derivative": True}, "triton"),
    ("langevin_step", {"d": 16, "derivative": False}, "triton"),
    ("langevin_step", {"d": 17, "derivative": False}, "torch"),  # batched cuSOLVER beats the fused kernels
    ("langevin_step", {"d": 64, "derivative": True}, "torch"),
    ("lse_kahler_metric", {"n": 8, "K": 256}, "triton"),
    ("lse_kahler_metric", {"n": 32, "K": 1024}, "torch"),  # Triton 5x slower than the closed form
    ("christoffel", {}, "triton"),
    ("an_op_without_rules", {}, "triton"),
])
def test_gpu_rules_pick_the_backend_measured_fastest(op, sizes, expected):
    assert _backend.gpu_backend(op, sizes, ALL_GPU) == expected


def test_gpu_rules_fall_back_along_their_preference_to_torch():
    assert _backend.gpu_backend("langevin_step", {"d": 2, "derivative": False}, ("triton",)) == "triton"
    assert _backend.gpu_backend("jtj", {}, ("cuda",)) == "cuda"
    assert _backend.gpu_backend("jtj", {}, ()) == "torch"
    assert _backend.gpu_backend("lse_kahler_metric", {"n": 4, "K": 3}, ()) == "torch"


def test_gpu_rule_missing_a_size_says_which():
    with pytest.raises(ValueError, match="needs size 'd'"):
        _backend.gpu_backend("langevin_step", {}, ALL_GPU)


def test_every_gpu_rule_states_its_measurement():
    for rule in _backend.GPU_RULES:
        assert rule.preference and set(rule.preference) <= set(_backend.BACKEND_NAMES) - {"cpp"}, rule
        assert "bench/RESULTS.md" in rule.evidence and "H100" in rule.evidence and "ms" in rule.evidence, rule
        assert rule.shapes, rule


def test_resolve_on_cuda_tensors_applies_the_rules(monkeypatch):
    """resolve() on a (faked) CUDA device: the table decides, among the backends that report available."""
    available = {"torch", "cuda", "triton"}
    monkeypatch.setattr(_backend, "status", lambda name: _backend.BackendStatus(name, name in available, "faked"))
    monkeypatch.delenv("PYGEO_BACKEND", raising=False)
    cuda, implemented = torch.device("cuda"), ("torch", "cpp", "cuda", "triton")
    assert _backend.resolve("lse_kahler_metric", cuda, "auto", implemented, sizes={"n": 32, "K": 1024}) == "torch"
    assert _backend.resolve("lse_kahler_metric", cuda, "auto", implemented, sizes={"n": 8, "K": 256}) == "triton"
    assert _backend.resolve("lse_kahler_metric", cuda, "triton", implemented, sizes={"n": 32, "K": 1}) == "triton"
    available.discard("triton")
    assert _backend.resolve("latent_metric", cuda, "auto", implemented, sizes={"d": 3, "N": 4, "full": False}) == "cuda"
    assert _backend.resolve("latent_metric", cuda, None, ("torch", "triton"), sizes={"d": 3, "N": 4, "full": False}) \
        == "torch"


def test_ops_pass_the_sizes_their_gpu_rules_read(monkeypatch):
    """Each op hands resolve() the sizes its rules test (recorded on CPU tensors, then fed to the rule)."""
    seen = {}
    real_resolve = _backend.resolve

    def recording(op, device, backend, implemented, sizes=None):
        seen[op] = sizes
        return real_resolve(op, device, backend, implemented, sizes=sizes)

    monkeypatch.setattr(_backend, "resolve", recording)
    z = torch.randn(3, 17, dtype=torch.float64)
    G = torch.eye(17, dtype=torch.float64).expand(3, 17, 17).contiguous()
    pygeo.ops.langevin_step(z, G, z, 0.1, z)
    pygeo.ops.latent_metric(z, torch.randn(4, 17, dtype=torch.float64),
                            torch.eye(17, dtype=torch.float64).expand(4, 17, 17).contiguous(), rho=1.0)
    w = torch.randn(2, 32, dtype=torch.complex128)
    pygeo.ops.lse_kahler_metric(w[:1], w, torch.ones(2, 32, dtype=torch.float64))
    expected = {"langevin_step": "torch", "latent_metric": "torch", "lse_kahler_metric": "torch"}
    for op, backend in expected.items():
        assert _backend.gpu_backend(op, seen[op], ALL_GPU) == backend, (op, seen[op])


def test_mark_constant_matches_what_dynamo_sets():
    """_backend marks resolve() constant for torch.compile without importing torch._dynamo: the mark must be the one
    the decorator sets."""
    import torch._dynamo

    marked = torch._dynamo.assume_constant_result(lambda: 0)
    assert {k: v for k, v in vars(marked).items()} == {"_dynamo_marked_constant": True}
    assert getattr(_backend.resolve, "_dynamo_marked_constant", False) is True


# ---- The public subpackages as attributes (issue 24 item 7).

DESIGN_SUBPACKAGES = ("models", "data", "cluster", "regularizers", "metrics", "geometry", "sample", "ops", "optim",
                      "diagnostics", "evaluate", "statistics")


def test_every_subpackage_is_an_attribute_after_import_pygeo():
    code = (
        "import importlib.util, sys, types\n"
        "import pygeo\n"
        f"names = {DESIGN_SUBPACKAGES!r}\n"
        "lazy = [n for n in ('models', 'data', 'cluster', 'regularizers', 'sample', 'optim', 'diagnostics', 'evaluate',"
        " 'statistics') if 'pygeo.' + n in sys.modules]\n"
        "print('loaded at import:', lazy, 'torch._dynamo' in sys.modules)\n"
        "for n in names:\n"
        "    if importlib.util.find_spec('pygeo.' + n) is None:\n"
        "        assert not hasattr(pygeo, n) and n not in dir(pygeo), n\n"
        "        continue\n"
        "    assert n in dir(pygeo) and n in pygeo.__all__, n\n"
        "    assert isinstance(getattr(pygeo, n), types.ModuleType), n\n"
        "print(pygeo.models.VAE.__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.path.dirname(__file__))
    assert out.returncode == 0, out.stderr
    assert "loaded at import: [] False" in out.stdout, out.stdout  # lazy, and no torch._dynamo (import time)
    assert "VAE" in out.stdout


def test_from_pygeo_import_every_public_name():
    for name in pygeo.__all__:
        exec(f"from pygeo import {name}", {})
    from pygeo import sample, ops  # noqa: F401


def test_a_missing_subpackage_is_an_attribute_error(monkeypatch):
    monkeypatch.setattr(pygeo, "_SUBPACKAGES", pygeo._SUBPACKAGES + ("no_such_subpackage",))
    with pytest.raises(AttributeError, match="no_such_subpackage"):
        pygeo.no_such_subpackage
    assert not hasattr(pygeo, "no_such_subpackage") and "no_such_subpackage" not in dir(pygeo)
    with pytest.raises(AttributeError, match="has no attribute 'not_a_name'"):
        pygeo.not_a_name
