"""The TensorRT builder: a deployment bundle always, an engine only where TensorRT runs.

It makes a TrtBuildPlan, checks the ONNX is in the form the plan needs, and writes the
bundle (model.onnx, trt_plan.json, build_engine.sh). Then it tries trt_apply; where
TensorRT or a GPU is missing (all our machines) the EngineArtifacts says engine_built=False
and its notes carry the one line to run on the device. It never claims an engine.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

from cunet_optimize.atomic import write_atomic
from cunet_optimize.engines.base import EngineArtifacts, OnnxContent, inspect_onnx
from cunet_optimize.engines.trt_apply import TensorRTUnavailable, apply_build_plan
from cunet_optimize.engines.trt_plan import (
    ONNX_FORMS,
    TrtBuildPlan,
    make_build_plan,
    plan_to_dict,
    render_shell_recipe,
    render_trtexec,
)
from cunet_optimize.errors import CUNetError

PLAN_FILE = "trt_plan.json"
RECIPE_FILE = "build_engine.sh"
BUNDLE_ONNX = "model.onnx"
BUNDLE_ENGINE = "model.engine"

# make_build_plan keywords a caller may pass as builder options.
PLAN_OPTIONS = (
    "trt_major", "batch", "workspace", "timing_cache", "dla_core", "gpu_fallback",
    "hardware_compat", "version_compat", "strongly_typed",
)  # fmt: skip


def check_onnx_form(onnx_path: Path, plan: TrtBuildPlan) -> OnnxContent:
    """CUNetError unless the ONNX is what plan.onnx_form says it must be."""
    content = inspect_onnx(onnx_path)
    form = plan.onnx_form
    wants_qdq = form.startswith("qdq-")
    wants_fp16 = form.endswith("fp16-cast")
    what = ONNX_FORMS[form]
    if content.has_int4:
        raise CUNetError(
            f"{onnx_path} holds INT4 weight tensors; TensorRT INT4 convolution is unverified, so "
            f"{plan.target} builds INT4 as dequantized weights: write the INT4-grid weights as float first"
        )
    if wants_qdq and not content.has_qdq:
        raise CUNetError(
            f"{onnx_path} has no Q/DQ nodes but {plan.precision} on TensorRT {plan.trt_major} needs: {what}; "
            "export it with the quantized precision first"
        )
    if not wants_qdq and content.has_qdq:
        raise CUNetError(
            f"{onnx_path} has Q/DQ nodes but precision {plan.precision} was asked; pass --precision int8 "
            "or build from the float export"
        )
    if wants_fp16 and not content.has_fp16:
        raise CUNetError(
            f"{onnx_path} is not cast to FP16 but TensorRT {plan.trt_major}"
            f"{' (strongly typed)' if plan.trt_major == 10 else ''} takes precision from the ONNX: needs {what} "
            "(python -m modelopt.onnx.autocast --low_precision_type fp16 ...)"
        )
    return content


class TensorRTBuilder:
    """ONNX -> TensorRT deployment bundle (+ engine where TensorRT and a GPU exist)."""

    backend = "tensorrt"

    def __init__(self, apply: bool = True):
        self.apply = apply  # False: write the bundle only, never import TensorRT

    def build(
        self,
        onnx_path: str | os.PathLike,
        target: str,
        precision: str,
        out_dir: str | os.PathLike,
        options: Mapping[str, Any] | None = None,
    ) -> EngineArtifacts:
        options = dict(options or {})
        # where else the engine goes (e.g. a Triton repository's 1/model.plan), relative to out_dir
        engine_copies = tuple(options.pop("engine_copies", ()))
        unknown = sorted(set(options) - set(PLAN_OPTIONS))
        if unknown:
            raise CUNetError(f"unknown TensorRT option(s) {unknown}; known: {list(PLAN_OPTIONS)}")
        source = Path(onnx_path)
        out = Path(out_dir)
        # Paths inside the plan are relative to the bundle, so the folder can be copied to the device.
        plan = make_build_plan(target, precision, BUNDLE_ONNX, engine_path=BUNDLE_ENGINE, **options)
        content = check_onnx_form(source, plan)
        coordinates = [name for name, rank in content.outputs if rank != 4]  # e.g. decoded landmarks

        out.mkdir(parents=True, exist_ok=True)
        bundle_onnx = out / BUNDLE_ONNX
        if not (bundle_onnx.exists() and os.path.samefile(source, bundle_onnx)):
            partial = out / f".{BUNDLE_ONNX}.partial"
            shutil.copyfile(source, partial)
            os.replace(partial, bundle_onnx)
        plan_path = write_atomic(out / PLAN_FILE, json.dumps(plan_to_dict(plan), indent=2) + "\n")
        recipe = write_atomic(
            out / RECIPE_FILE, render_shell_recipe(plan, coordinate_outputs=coordinates, engine_copies=engine_copies),
            mode=0o755
        )

        artifacts = {"onnx": str(bundle_onnx), "plan": str(plan_path), "recipe": str(recipe)}
        notes = list(plan.notes)
        built = False
        backend_version = f"{plan.trt_major}.x (planned, >= {plan.min_trt_version})"
        if self.apply:
            try:
                engine = apply_build_plan(plan, out)
            except TensorRTUnavailable as exc:
                notes.append(str(exc))  # says what to run on the device
            else:
                import tensorrt  # noqa: PLC0415  (present: apply_build_plan just used it)

                built = True
                backend_version = tensorrt.__version__
                _place_copies(engine, out, engine_copies)
                artifacts["engine"] = str(engine)
        else:
            notes.append(f"bundle only, no engine built; on the {plan.target} run: bash {recipe}")
        settings = plan_to_dict(plan)
        settings["trtexec"] = render_trtexec(plan)
        return EngineArtifacts(
            backend=self.backend,
            backend_version=backend_version,
            target=plan.target,
            precision=precision,
            artifacts=artifacts,
            settings=settings,
            notes=notes,
            engine_built=built,
        )


def _place_copies(engine: Path, out: Path, copies: Sequence[str]) -> None:
    """The built engine also where a deployment expects it (a Triton repository's 1/model.plan),
    as the recipe does on the device; outside build() so the TensorRT API check reads no paths."""
    for copy in copies:
        (out / copy).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(engine, out / copy)
