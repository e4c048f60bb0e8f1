"""Every Triton kernel launch compiles for an H100 (sm_90) within its shared memory, checked without a GPU.

CPU CI runs the Triton kernels through the interpreter, which knows no shared-memory limit: a launch that needs more
than the H100's 227 KB per block passes there and fails on the device. tests/triton_offline_compile.py compiles every
launch the wrappers make (the sizes whose block settings differ, float32 and float64) with Triton's own compiler for
sm_90 and checks the shared memory each needs.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


def test_every_triton_launch_compiles_for_sm90_within_shared_memory():
    script = Path(__file__).with_name("triton_offline_compile.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=1200)
    lines = result.stdout.splitlines()
    compiled = [line for line in lines if line.startswith("ok")]
    failing = [line for line in lines if line.startswith("FAIL")]
    if "launches compiled" not in result.stdout or not compiled:
        # The script stopped before compiling anything, or nothing compiled at all: Triton's CUDA toolchain (ptxas,
        # the NVIDIA backend) is missing here. The wrappers themselves are exercised by the interpreter tests.
        pytest.skip("cannot compile Triton kernels for sm_90 here: " + (result.stderr or result.stdout)[-500:])
    assert result.returncode == 0, "\n".join(failing)
