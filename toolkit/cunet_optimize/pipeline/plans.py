"""Per-conv precision plans as builds and `qat` record and read them: the plan a `qat --plan`
checkpoint was fine-tuned from, the plan of an auto build's build.json, and the `auto` fields
of build.json that describe a plan (quant/auto.py makes the decisions, pipeline/auto_build.py
searches)."""

from __future__ import annotations

import json
from pathlib import Path

from cunet_optimize.errors import CUNetError
from cunet_optimize.manifests.build import BUILD_FILE, read_build_manifest
from cunet_optimize.manifests.schema import ManifestError
from cunet_optimize.quant import auto


def plan_of_qat_checkpoint(path) -> dict:
    """{conv: format} of a QAT checkpoint fine-tuned from an auto plan (`qat --plan`)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise CUNetError(f"{path}: not a QAT checkpoint ({e}); pass the best.safetensors of `qat --plan`") from None
    if "layer_formats" not in meta:
        raise CUNetError(f"{path}: QAT checkpoint of {meta.get('scheme', '?')}, not of an auto plan; build it with "
                         f"--precision {meta.get('scheme', 'int8')}, or run `qat --plan BUILD_DIR`")
    return json.loads(meta["layer_formats"])


def _auto_record(path):
    """The `auto` section of an auto build (its folder or build.json)."""
    path = Path(path)
    manifest = path / BUILD_FILE if path.is_dir() else path
    try:
        record = read_build_manifest(manifest).auto
    except ManifestError:
        record = None
    if record is None or not record.plan:  # not a build, or one without an auto plan
        raise CUNetError(f"{path}: no auto plan here; pass the folder (or build.json) of a "
                         "`build --precision auto`")
    return record


def load_plan(path) -> dict:
    """{conv: format} of an auto build (its folder or build.json), for `qat --plan`."""
    return {conv: fmt for conv, fmt in _auto_record(path).plan.items() if fmt != "int8"}


def load_plan_int4_block(path) -> int | None:
    """Input channels per scale of an auto build's INT4 convs (None: per output channel), as its
    search measured them (quant.policy.int4_block_for of its target), for `qat --plan` to
    fine-tune the same; builds from before the field searched in blocks."""
    return _auto_record(path).extra.get("int4_block", auto.DEFAULT_INT4_BLOCK)


def plan_fields(layers, group_plan: dict, formats, float_dtype: str, int4_block: int | None) -> dict:
    """The `auto` fields of build.json that describe a plan, whoever chose it (the search, or
    `qat --plan` before a `build --qat`): each conv's format and weight bytes, and the plan's
    weight bytes and latency units beside those of every uniform format, and the INT4 convs'
    granularity (`int4_block`: input channels per scale, None for one per output channel)."""
    size = auto.group_costs(layers, formats, "size", float_dtype, int4_block)
    latency = auto.group_costs(layers, formats, "latency", float_dtype, int4_block)
    uniform = {f: {g: f if f in size[g] else "int8" for g in size} for f in formats}
    conv_plan = auto.layer_plan(layers, group_plan)
    return {
        "group_plan": dict(group_plan),
        "int4_block": int4_block,
        "plan": conv_plan,
        "layers": [{"name": layer.name, "group": layer.group, "role": layer.role,
                    "weight_shape": list(layer.weight_shape), "params": layer.params, "macs": layer.macs,
                    "format": conv_plan[layer.name],
                    "weight_bytes": auto.layer_cost(layer, conv_plan[layer.name], "size", float_dtype,
                                                   int4_block)}
                   for layer in layers],
        "weight_bytes": auto.plan_cost(size, group_plan),
        "weight_bytes_uniform": {f: auto.plan_cost(size, p) for f, p in uniform.items()},
        "latency_units": auto.plan_cost(latency, group_plan),
        "latency_units_uniform": {f: auto.plan_cost(latency, p) for f, p in uniform.items()},
    }


def qat_plan_record(qmodel, target, budget: float, input_size: tuple[int, int], float_dtype: str) -> dict:
    """build.json's `auto` section for `build --precision auto --qat CKPT`: the plan that
    `qat --plan` fine-tuned, per conv (no search ran, so no sensitivity, visits or back-off);
    `float_dtype`: what its float convs run as (pipeline/build.py plan_float_type)."""
    formats = auto.target_formats(target)
    layers = auto.layer_infos(qmodel, "conv", input_size)
    conv_plan = {layer.name: qmodel.layer_formats.get(layer.name, "int8") for layer in layers}
    return {"source": "qat checkpoint", "grain": "conv", "budget": budget, "formats": list(formats),
            # the granularity `qat --plan` fine-tuned (the plan's, recorded in the checkpoint)
            "float_type": float_dtype, **plan_fields(layers, conv_plan, formats, float_dtype, qmodel.int4_block)}
