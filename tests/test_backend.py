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
