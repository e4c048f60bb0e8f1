"""Compile every Triton kernel launch of pygeo for an H100 (sm_90) without a GPU, and check its shared memory.

    python tests/triton_offline_compile.py      (run by tests/test_triton_compile.py in a fresh process)

The Python wrappers in triton_kernels/ run on CPU tensors as they would on CUDA ones, but every kernel launch is
intercepted: its arguments give the signature (tensor dtypes, integer and float scalars) and its keyword arguments the
constexprs and num_warps, and the kernel is compiled with triton.compile for GPUTarget("cuda", 90, 32). A launch whose
shared memory exceeds the H100's 227 KB per block would fail on the device ("out of resource: shared memory"); on CPU
CI, through the interpreter, it would pass. Prints one line per distinct launch and exits 1 on any failure.
Needs the interpreter off (TRITON_INTERPRET unset), which is why it runs in its own process.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

H100_SHARED_BYTES = 232448  # cudaDevAttrMaxSharedMemoryPerBlockOptin on an H100
TARGET = GPUTarget("cuda", 90, 32)
_DTYPES = {torch.float32: "fp32", torch.float64: "fp64", torch.int32: "i32", torch.int64: "i64", torch.bool: "i1"}
_LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas")


def _scalar_type(param, value) -> str:
    if param.annotation_type:
        return param.annotation_type
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"unexpected kernel argument {param.name}={value!r}")


def _capture(launches):
    """Replace JITFunction.run: record (kernel, signature, constexprs, options) instead of launching."""

    def run(self, *args, grid, warmup, **kwargs):
        options = {k: kwargs.pop(k) for k in _LAUNCH_OPTIONS if k in kwargs}
        bound = dict(zip([p.name for p in self.params], args))
        bound.update(kwargs)
        signature, constexprs = {}, {}
        for param in self.params:
            value = bound[param.name]
            if param.is_constexpr:
                signature[param.name] = "constexpr"
                constexprs[param.name] = value
            elif isinstance(value, torch.Tensor):
                signature[param.name] = "*" + _DTYPES[value.dtype]
            else:
                signature[param.name] = _scalar_type(param, value)
        key = (self.fn.__name__, tuple(sorted(signature.items())), tuple(sorted(constexprs.items())),
               tuple(sorted(options.items())))
        launches[key] = (self, signature, constexprs, options)

    JITFunction.run = run


def _exercise():
    """Call every Triton wrapper at the sizes whose launches differ (block sizes, paths), both dtypes."""
    from triton_kernels import christoffel, jtj, langevin_step, latent_metric, lse_kahler_metric, mlp_metric

    for dtype in (torch.float32, torch.float64):
        def t(*shape):
            return torch.randn(*shape, dtype=dtype)

        for d in (2, 7, 16, 64):
            B, D = 3, 784
            jtj.jtj(t(B, D, d), None, 0, t(B, d, d))
            jtj.jtj(t(B, D, d), t(B, D), D, t(B, d, d))
            G, dG = t(B, d, d), t(B, d, d, d)
            christoffel.christoffel(G, dG, t(B, d, d, d), torch.zeros(B, dtype=torch.int32))
            z = t(B, d)
            h = torch.ones(B, dtype=dtype)
            outputs = (t(B, d), t(B, d), t(B), t(B), t(B), torch.zeros(B, dtype=torch.bool))
            langevin_step.langevin_step(z, G, z, h, z, None, None, None, *outputs)
            langevin_step.langevin_step(z, G, z, h, z, dG, z, z, *outputs)
            N = 70
            for precisions in (t(N, d).abs() + 0.5, t(N, d, d)):
                full = precisions.dim() == 3
                dd = d * d if full else d
                latent_metric.forward(z, t(N, d), precisions, 0.01, 0.1, 1.0, t(B, dd), t(B), t(B, d, dd))
                latent_metric.forward(z, t(N, d), precisions, 0.0, 0.0, 1.0, t(B, dd), t(B), None)
                latent_metric.vjp(z, t(N, d), precisions, 0.01, 0.1, 1.0, t(B, dd), t(B), t(B, d))
            weights = [t(512, d), t(784, 512)]
            biases = [t(512), t(784)]
            for bernoulli, upper in ((False, False), (False, True), (True, False)):
                mlp_metric.mlp_metric(z, weights, biases, [6, 0], [0.0, 0.0, 0.0, 0.0], None, bernoulli, 1e-6, upper,
                                      t(B, d, d))
            # Two hidden layers: the second one's tangents are not the identity.
            mlp_metric.mlp_metric(z, [t(64, d), t(512, 64), t(784, 512)], [t(64), t(512), t(784)], [6, 6, 0],
                                  [0.0] * 6, None, True, 1e-6, False, t(B, d, d))
            # One linear layer: the tangents entering the last layer are the identity (its FIRST path).
            mlp_metric.mlp_metric(z, [t(784, d)], [t(784)], [0], [0.0, 0.0], t(784), False, 1e-6, False, t(B, d, d))
        for n in (2, 8, 17, 32):
            B, K = 3, 40
            z, centers = t(B, n, 2), t(K, n, 2)
            for precisions, diagonal in ((t(K, n, n, 2), False), (t(K, n).abs() + 0.5, True)):
                lse_kahler_metric.lse_kahler_metric(z, centers, precisions, t(K), 0.7, diagonal, t(B, n, n, 2))


def main() -> int:
    launches = {}
    _capture(launches)
    _exercise()
    failures = 0
    for (name, _, constexprs, options), (kernel, signature, constexpr_values, launch_options) in sorted(
            launches.items(), key=lambda item: str(item[0])):
        settings = ", ".join(f"{k}={v}" for k, v in constexprs + options)
        try:
            compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexpr_values),
                                      target=TARGET, options=launch_options)
        except Exception as error:  # noqa: BLE001 - report every kernel, then fail
            failures += 1
            print(f"FAIL {name}({settings}): does not compile for sm_90: {type(error).__name__}: {error}")
            continue
        shared = compiled.metadata.shared
        status = "ok  " if shared <= H100_SHARED_BYTES else "FAIL"
        failures += shared > H100_SHARED_BYTES
        print(f"{status} {name}({settings}): {shared} bytes of shared memory")
    print(f"{len(launches)} launches compiled for sm_90, {failures} failing")
    return 1 if failures or not launches else 0


if __name__ == "__main__":
    sys.exit(main())
