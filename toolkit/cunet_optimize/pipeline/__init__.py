"""The orchestration above the stages, which no stage imports: `run_build` takes a build's
options to an engine folder, through pipeline/build.py (the build as a straight line) and, for
`--precision auto` without a plan, pipeline/auto_build.py (the search, then builds of its plan);
pipeline/plans.py reads and records per-conv plans."""

from __future__ import annotations

from dataclasses import replace

from cunet_optimize.pipeline.auto_build import run_auto_build
from cunet_optimize.pipeline.build import BuildOptions, BuildReport, run_stages
from cunet_optimize.pipeline.plans import plan_of_qat_checkpoint


def run_build(opts: BuildOptions, echo=print, progress: bool = True) -> BuildReport:
    """Build `opts` into WORKDIR/engines/<name>/ (the command `build` and the API's `build`).
    `--precision auto` searches a plan first (run_auto_build), unless `--qat` gives the plan a
    `qat --plan` checkpoint was fine-tuned from."""
    if opts.precision == "auto" and opts.layer_formats is None:
        if not opts.qat_checkpoint:
            return run_auto_build(opts, echo, progress)
        opts = replace(opts, layer_formats=plan_of_qat_checkpoint(opts.qat_checkpoint))
    return run_stages(opts, echo, progress)


__all__ = ["BuildOptions", "BuildReport", "run_build"]
