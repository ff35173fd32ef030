"""Checks of everything a deployment emits, on this machine, before anyone ships it.

- config.pbtxt: parsed against Triton's own ModelConfig schema (model_config.proto, generated
  into `tritonclient.grpc.model_config_pb2`; loaded by file path, so the grpc extra and its
  protobuf pin are not needed), then checked against the ONNX: names, data types, dims, batch,
  name = folder, preferred batch sizes <= max_batch_size.
- the nvinfer file: every key in nvinfer's key set, and infer-dims, output names, scale,
  colour order and network mode against the ONNX and the build.
The live check (the real server loading each repository) is serving/server.py's `check_loads`.
"""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
from pathlib import Path

from cunet_optimize.serving.deepstream import NETWORK_MODE, NET_SCALE_FACTOR, NVINFER_KEYS, SECTION, parse_nvinfer
from cunet_optimize.serving.model_io import ModelIO

SCHEMA_MISSING = "Triton's ModelConfig schema not checked: `pip install tritonclient` (the `serve` extra) ships it"


@lru_cache(maxsize=1)
def model_config_class():
    """Triton's ModelConfig message class, or None without tritonclient."""
    spec = importlib.util.find_spec("tritonclient")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "grpc" / "model_config_pb2.py"
    if not path.is_file():
        return None
    module_spec = importlib.util.spec_from_file_location("cunet_triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.ModelConfig


def check_triton_config(text: str, folder_name: str, io: ModelIO) -> list[str]:
    """What is wrong with a config.pbtxt for the model in folder `folder_name` serving a graph
    with `io` ([] = nothing); raises RuntimeError when the schema is not available."""
    from google.protobuf import text_format

    config_class = model_config_class()
    if config_class is None:
        raise RuntimeError(SCHEMA_MISSING)
    config = config_class()
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        return [f"not a Triton ModelConfig: {exc}"]
    problems = []
    if config.name != folder_name:
        problems.append(f"name {config.name!r} differs from its folder {folder_name!r} (Triton refuses it)")
    if not (config.platform or config.backend):
        problems.append("neither platform nor backend is set")
    batched = config.max_batch_size > 0
    if batched != io.dynamic_batch:
        problems.append(f"max_batch_size {config.max_batch_size} but the ONNX's batch is "
                        + ("free: give max_batch_size > 0" if io.dynamic_batch else "fixed: max_batch_size must be 0"))
    for preferred in config.dynamic_batching.preferred_batch_size:
        if preferred > config.max_batch_size:
            problems.append(f"preferred batch size {preferred} > max_batch_size {config.max_batch_size}")
    for kind, declared, actual in (("input", config.input, io.inputs), ("output", config.output, io.outputs)):
        by_name = {t.name: t for t in actual}
        names = [t.name for t in declared]
        if sorted(names) != sorted(by_name) or len(set(names)) != len(names):
            problems.append(f"{kind}s {names} differ from the ONNX's {list(by_name)}")
        for tensor in declared:
            onnx_tensor = by_name.get(tensor.name)
            if onnx_tensor is None:
                continue
            data_type = config_class.DESCRIPTOR.fields_by_name["input"].message_type.fields_by_name[
                "data_type"].enum_type.values_by_number[tensor.data_type].name
            if data_type != onnx_tensor.data_type:
                problems.append(f"{kind} {tensor.name}: data_type {data_type}, the ONNX's is {onnx_tensor.data_type}")
            expected = onnx_tensor.item_dims if batched else onnx_tensor.shape
            if tuple(tensor.dims) != tuple(expected):
                problems.append(f"{kind} {tensor.name}: dims {list(tensor.dims)}, the ONNX's are {list(expected)}"
                                + (" (batch excluded)" if batched else " (batch included: max_batch_size 0)"))
    return problems


def check_nvinfer_config(text: str, io: ModelIO, precision: str, config_dir: str | os.PathLike) -> list[str]:
    """What is wrong with an nvinfer config for a graph with `io` built at `precision`; file
    keys are resolved from `config_dir` (the engine file may be absent: built on the device)."""
    try:
        sections = parse_nvinfer(text)
    except ValueError as exc:
        return [f"not an nvinfer config: {exc}"]
    if SECTION not in sections:
        return [f"no [{SECTION}] section"]
    props = sections[SECTION]
    problems = [f"unknown nvinfer key {k!r}" for k in props if k not in NVINFER_KEYS]
    image = io.image
    expected_dims = ";".join(str(d) for d in image.shape[1:])
    if props.get("infer-dims") != expected_dims:
        problems.append(f"infer-dims {props.get('infer-dims')!r}, the ONNX input {image.name} is {expected_dims}")
    outputs = [o for o in props.get("output-blob-names", "").split(";") if o]
    unknown = [o for o in outputs if o not in {t.name for t in io.outputs}]
    if not outputs or unknown:
        problems.append(f"output-blob-names {outputs} are not the ONNX's outputs {[t.name for t in io.outputs]}")
    mode = NETWORK_MODE.get(precision, NETWORK_MODE["fp16"])
    if props.get("network-mode") != str(mode):
        problems.append(f"network-mode {props.get('network-mode')!r} but the build is {precision} ({mode})")
    try:
        scale_ok = abs(float(props.get("net-scale-factor", "nan")) - NET_SCALE_FACTOR) < 1e-12
    except ValueError:
        scale_ok = False
    if not scale_ok or any(float(v) != 0 for v in props.get("offsets", "0").split(";")):
        problems.append("net-scale-factor/offsets are not RGB / 255 with zero offsets, our preprocessing")
    if props.get("model-color-format") != "0":
        problems.append(f"model-color-format {props.get('model-color-format')!r}: our model takes RGB (0)")
    for key in ("process-mode", "output-tensor-meta", "network-type"):
        if key not in props:
            problems.append(f"{key} missing (secondary mode with tensor meta needs it)")
    for key in ("onnx-file", "int8-calib-file"):
        if key in props and not (Path(config_dir) / props[key]).is_file():
            problems.append(f"{key} {props[key]} does not exist beside the config")
    return problems
