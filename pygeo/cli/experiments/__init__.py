"""`python -m pygeo experiment NAME`: the source papers' claims, tested on MNIST.

An experiment is a module pygeo/cli/experiments/<module>.py with
    TITLE: str                      the report's title
    DESCRIPTION: str                one line for `--help`
    run(ctx: ExperimentContext) -> str   markdown body; saves PNG figures with ctx.save_figure and links them by name
and one line in EXPERIMENTS below. The shared runner (pygeo.cli.experiments.common.run_experiment) loads nothing
itself: it gives the module the options, a progress helper, the seeds and a temporary output folder, then writes
report.md with the date, machine, command and wall time, and renames the folder into place only when the run ends
(an interrupted or failed run leaves no half-written report under --out).
"""
from __future__ import annotations

# Command-line name -> module under pygeo/cli/experiments/ (imported only when that experiment runs).
EXPERIMENTS = {
    "natural-gradient": "natural_gradient",
    "collapse": "collapse",
    "sampling": "sampling",
    "identifiability": "identifiability",
}
