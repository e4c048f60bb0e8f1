"""Everything that needs a GPU, in one call: build, check, time.

    python bench/gpu.py [--out DIR] [--skip-build] [--only PATTERN]

1. builds the extension with its CUDA kernels (pip install --no-build-isolation --no-deps -e .),
2. runs the test suite on the GPU (every backend against the float64 reference, CUDA and Triton included),
3. runs every bench/bench_*.py with pytest-benchmark (CUDA sizes; timings synchronise inside the timed call),
4. prints, per op and size, the median time of each provider, its ratio to the plain-PyTorch baseline of the same
   group and its fraction of the roofline: max(flops / peak_flops, bytes / peak_bandwidth) / time.
Results go to --out (default $OUT, else ./gpu-results) as three files: gpu.log (everything printed), benchmarks.json
(all pytest-benchmark results) and gpu_summary.md (the table).
"""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# H100 SXM ceilings measured in shared/PERF.md (fp32 FMA matrix product, device-to-device copy read + write).
PEAK_FP32_FLOPS = 51e12
PEAK_BYTES_PER_S = 2966e9
BASELINE_PROVIDERS = ("einsum", "jacfwd", "torch", "reference", "plain", "gemm", "closed_form", "torch_closed_form",
                      "broadcast")


def run(cmd, log: Path, cwd: Path = ROOT) -> int:
    """Run cmd, appending its output to log and echoing the tail."""
    print("+", " ".join(cmd), flush=True)
    process = subprocess.run(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with open(log, "a") as handle:
        handle.write(f"\n+ {' '.join(cmd)}\n{process.stdout}")
    print(process.stdout[-3000:], flush=True)
    return process.returncode


def provider_of(name: str) -> str:
    """test_op[provider-...] -> provider (the first parametrisation id)."""
    inside = name.split("[", 1)[1].rstrip("]") if "[" in name else name
    return inside.split("-", 1)[0]


def summarise(results, out: Path) -> str:
    rows = []
    for data in results:
        groups = defaultdict(list)
        for bench in data["benchmarks"]:
            groups[bench["group"] or bench["name"]].append(bench)
        for group, benches in sorted(groups.items()):
            if "cuda" not in group:
                continue
            baseline = next((b for b in benches if provider_of(b["name"]) in BASELINE_PROVIDERS), None)
            for bench in sorted(benches, key=lambda b: b["stats"]["median"]):
                median = bench["stats"]["median"]
                extra = bench.get("extra_info", {})
                fraction = ""
                if extra.get("flops") or extra.get("bytes"):
                    ideal = max(extra.get("flops", 0) / PEAK_FP32_FLOPS, extra.get("bytes", 0) / PEAK_BYTES_PER_S)
                    fraction = f"{ideal / median:.1%}"
                ratio = f"{baseline['stats']['median'] / median:.2f}x" if baseline else ""
                rows.append(f"| {group} | {provider_of(bench['name'])} | {median * 1e3:.3f} | {ratio} | {fraction} |")
    table = "| group | provider | median ms | speed-up vs baseline | roofline fraction |\n|---|---|---|---|---|\n" + "\n".join(rows)
    (out / "gpu_summary.md").write_text(table + "\n")
    return table


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu-results"))
    parser.add_argument("--skip-build", action="store_true")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--only", default="", help="pytest -k expression for the benchmarks")
    parser.add_argument("--test-workers", type=int, default=8, help="pytest-xdist workers for the test suite (0: none)")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    log = out / "gpu.log"
    status = 0
    if not args.skip_build:
        build = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-e", "."]
        if run(build, log) != 0:
            return 1
    if not args.skip_tests:
        has_xdist = importlib.util.find_spec("xdist") is not None
        workers = ["-n", str(args.test_workers)] if args.test_workers and has_xdist else []
        status |= run([sys.executable, "-m", "pytest", "-q", "--durations=10", *workers], log, cwd=ROOT / "tests")
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for bench in sorted(glob.glob(str(ROOT / "bench" / "bench_*.py"))):
            target = Path(scratch) / f"{Path(bench).stem}.json"
            selection = "cuda" + (f" and ({args.only})" if args.only else "")
            cmd = [sys.executable, "-m", "pytest", "-q", bench, "-k", selection, "--benchmark-json", str(target),
                   "--benchmark-columns=median,iqr", "--benchmark-min-rounds=10"]
            run(cmd, log, cwd=ROOT / "bench")
            if target.exists() and target.stat().st_size:  # empty when the selection ran nothing
                results.append(json.loads(target.read_text()))
            # Written after every file, so a run stopped at its time limit still leaves what it measured.
            (out / "benchmarks.json").write_text(json.dumps(results))
            summarise(results, out)
    print(summarise(results, out))
    return status


if __name__ == "__main__":
    sys.exit(main())
