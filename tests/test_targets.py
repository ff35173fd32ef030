"""The target registry: what each device can run, refusals, and `cunet-optimize targets`."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from cunet_optimize.commands import targets as targets_cmd
from cunet_optimize.targets import (
    PRECISIONS,
    TARGETS,
    check_precision,
    get_target,
)
from cunet_optimize.errors import CUNetError

EXPECTED = {
    # name: (backend, device, compute capability, DLA cores) -- NVIDIA's published figures
    "cpu": ("onnxruntime", "cpu", None, 0),
    "jetson-orin-nano": ("tensorrt", "jetson", (8, 7), 0),
    "jetson-orin-nx": ("tensorrt", "jetson", (8, 7), 2),
    "jetson-agx-orin": ("tensorrt", "jetson", (8, 7), 2),
    "t4": ("tensorrt", "gpu", (7, 5), 0),
    "a100": ("tensorrt", "gpu", (8, 0), 0),
    "l4": ("tensorrt", "gpu", (8, 9), 0),
    "h100": ("tensorrt", "gpu", (9, 0), 0),
}


def test_registry_holds_the_documented_targets():
    assert set(TARGETS) == set(EXPECTED)
    for name, (backend, device, cc, dla) in EXPECTED.items():
        spec = get_target(name)
        assert (spec.backend, spec.device, spec.compute_capability, spec.dla_cores) == (
            backend,
            device,
            cc,
            dla,
        )


def test_every_tensorrt_target_builds_on_device_and_has_a_default_major():
    for spec in TARGETS.values():
        if spec.backend == "tensorrt":
            assert spec.build_on_device
            assert spec.default_tensorrt_major in spec.tensorrt_majors
            assert spec.workspace_bytes and spec.workspace_bytes % (1 << 20) == 0
        else:
            assert spec.tensorrt_majors == ()
        b_min, b_opt, b_max = spec.batch
        assert 1 <= b_min <= b_opt <= b_max


def test_tensorrt_11_only_where_nvidia_documents_it():
    # TensorRT 11.4.1 supports JetPack 7.2.2+ on AGX Orin (and Thor) only; Orin Nano/NX stay on 10.
    assert get_target("jetson-agx-orin").tensorrt_release(11).min_version == "11.4.1"
    for name in ("jetson-orin-nano", "jetson-orin-nx"):
        with pytest.raises(CUNetError, match="cannot build with TensorRT 11"):
            get_target(name).tensorrt_release(11)
    assert get_target("jetson-orin-nano").tensorrt_release(10).min_version == "10.3"  # JetPack 6


def test_target_spec_is_immutable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        get_target("t4").dla_cores = 2


def test_unknown_target_lists_the_known_ones():
    with pytest.raises(CUNetError) as err:
        get_target("jetson-tx2")
    message = str(err.value)
    assert "jetson-tx2" in message
    for name in EXPECTED:
        assert name in message


def test_fp8_only_from_compute_capability_8_9_and_marked_unverified():
    for name, spec in TARGETS.items():
        cc = spec.compute_capability
        if cc is not None and cc >= (8, 9):
            support = check_precision(name, "fp8")
            assert support.native and not support.verified and "unverified" in support.note
        else:
            with pytest.raises(CUNetError, match=f"target {name} cannot run precision fp8; it runs: "):
                check_precision(name, "fp8")


def test_refusal_lists_what_the_target_runs():
    with pytest.raises(CUNetError) as err:
        check_precision("jetson-orin-nano", "fp8")
    assert str(err.value).startswith(
        "target jetson-orin-nano cannot run precision fp8; it runs: fp32, fp16, int8"
    )
    with pytest.raises(CUNetError, match="target cpu cannot run precision fp16"):
        check_precision("cpu", "fp16")


def test_int4_is_never_native_and_says_how_it_runs():
    """No target has INT4 conv kernels: the CPU runs per-channel INT4 as the INT8 convs it
    equals (quant.policy.int4_block_for), TensorRT targets dequantize it to FP16."""
    for name, spec in TARGETS.items():
        support = check_precision(name, "int4")
        assert not support.native
        if spec.backend == "onnxruntime":
            assert support.executed_as == "int8" and "per output channel" in support.note
        else:
            assert support.executed_as == "fp16"
            assert "dequantized" in support.note and "storage format" in support.note


def test_dla_runs_only_fp16_and_int8():
    assert check_precision("jetson-agx-orin", "int8", on_dla=True).executed_as == "int8"
    assert check_precision("jetson-orin-nx", "fp16", on_dla=True).native
    with pytest.raises(CUNetError, match="DLA cannot run precision fp32; it runs: fp16, int8"):
        check_precision("jetson-agx-orin", "fp32", on_dla=True)
    with pytest.raises(CUNetError, match="has no DLA cores"):
        check_precision("jetson-orin-nano", "int8", on_dla=True)
    assert check_precision("jetson-agx-orin", "int4", on_dla=True).executed_as == "fp16"


def test_unknown_precision_is_refused():
    with pytest.raises(CUNetError, match="unknown precision 'int2'"):
        check_precision("t4", "int2")


def test_targets_command_prints_a_row_per_target(capsys):
    assert targets_cmd.run(argparse.Namespace(json=False)) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for name in EXPECTED:
        assert any(line.startswith(name + " ") for line in lines), name
    h100 = next(line for line in lines if line.startswith("h100 "))
    assert "9.0" in h100 and "fp8*" in h100
    agx = next(line for line in lines if line.startswith("jetson-agx-orin "))
    assert "2 (fp16,int8)" in agx and "11.4.1+" in agx


def test_targets_command_json_round_trips_the_registry(capsys):
    assert targets_cmd.run(argparse.Namespace(json=True)) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["name"] for d in data] == list(TARGETS)
    by_name = {d["name"]: d for d in data}
    assert by_name["l4"]["compute_capability"] == [8, 9]
    assert by_name["cpu"]["compute_capability"] is None
    assert set(by_name["a100"]["precisions"]) <= set(PRECISIONS)


def test_targets_command_registers_with_argparse():
    parser = argparse.ArgumentParser(prog="cunet-optimize")
    targets_cmd.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["targets", "--json"])
    assert args.json is True and args.func is targets_cmd.run
