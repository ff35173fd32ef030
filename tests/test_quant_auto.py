"""`build --precision auto`: the per-conv plan mechanism, the search, the back-off, plan reloads."""

from __future__ import annotations

import json
import math

import onnx
import pytest
import torch

from cunet_optimize.targets import get_target
from cunet_optimize.models import CUNet, create_model
from cunet_optimize.quant import auto
from cunet_optimize.quant.qmodel import quantize_model
from cunet_optimize.quant.quantizers import BlockQuantizer, IntQuantizer
from conftest import tiny_auto_args, tiny_config


def _layer(name, group, shape=(16, 32, 1, 1), role="conv1x1", macs=1000):
    return auto.LayerInfo(name, group, role, shape, macs)


def _table(delta, int8_degradation=0.01):
    return auto.SensitivityTable("NME", 8, 5.0, 5.0 + int8_degradation, int8_degradation, delta)


LAYERS = [_layer("stem", "stem", (8, 3, 7, 7), "stem"), _layer("a", "a"), _layer("b", "b"), _layer("c", "c"),
          _layer("head", "head", (4, 16, 1, 1), "last_head")]
DELTA = {"stem": {"int8": 0.0, "float": -0.005}, "a": {"int8": 0.0, "int4": 0.01, "float": -0.002},
         "b": {"int8": 0.0, "int4": 0.2, "float": -0.001}, "c": {"int8": 0.0, "int4": 0.03, "float": 0.0},
         "head": {"int8": 0.0, "float": -0.001}}


def test_target_formats_are_what_the_target_executes_or_stores():
    assert auto.target_formats(get_target("cpu")) == ("int4", "int8", "float")
    assert auto.float_type(get_target("cpu")) == "fp32"
    assert auto.float_type(get_target("jetson-orin-nano")) == "fp16"
    costs = auto.group_costs(LAYERS, ("int4", "int8", "float"), "size")
    assert "int4" not in costs["stem"] and "int4" not in costs["head"]  # the int4 scheme's edge rule
    assert costs["a"]["int4"] < costs["a"]["int8"] < costs["a"]["float"]


@pytest.mark.parametrize("budget", [0.002, 0.02, 0.05, 0.1, 0.3, 1.0])
def test_search_respects_the_budget_and_the_formats(budget):
    formats = ("int4", "int8", "float")
    table, costs = _table(DELTA), auto.group_costs(LAYERS, formats, "size")
    result = auto.search_plan(table, costs, budget)
    assert result.feasible and result.predicted <= budget + 1e-12
    assert result.predicted == pytest.approx(auto.predict_degradation(table, result.plan))
    assert all(f in costs[g] for g, f in result.plan.items())
    # no single group can move to a cheaper format and still fit (the plan is locally cheapest)
    for g, f in result.plan.items():
        for cheaper in (h for h in costs[g] if costs[g][h] < costs[g][f]):
            p = dict(result.plan, **{g: cheaper})
            assert auto.predict_degradation(table, p) > budget
    assert result.visited[0]["step"] == "cheapest" and result.visited[-1]["cost"] == result.cost


def test_search_prefers_int4_where_it_is_cheap_in_accuracy():
    table, costs = _table(DELTA), auto.group_costs(LAYERS, ("int4", "int8", "float"), "size")
    plan = auto.search_plan(table, costs, 0.05).plan
    assert plan["a"] == "int4" and plan["c"] == "int4" and plan["b"] == "int8"


def test_search_without_int8_and_infeasible_budget():
    table = _table(DELTA, int8_degradation=0.5)
    costs = auto.group_costs(LAYERS, ("int4", "int8", "float"), "size")
    result = auto.search_plan(table, costs, 0.1)
    assert not result.feasible
    assert all(f == "float" or costs[g].get("float") is None for g, f in result.plan.items() if g != "c")


def test_latency_objective_never_picks_int4_on_a_target_that_runs_int8():
    """INT4 is a storage format: it runs at float speed, so for latency INT8 dominates it."""
    table, costs = _table(DELTA), auto.group_costs(LAYERS, ("int4", "int8", "float"), "latency")
    assert "int4" not in auto.search_plan(table, costs, 0.1).plan.values()


def test_back_off_raises_the_most_sensitive_group_one_step():
    table, costs = _table(DELTA), auto.group_costs(LAYERS, ("int4", "int8", "float"), "size")
    plan = {"stem": "int8", "a": "int4", "b": "int4", "c": "int4", "head": "int8"}
    new, why = auto.back_off(table, costs, plan)
    assert new == dict(plan, b="int8") and "raise b" in why
    top = {g: "float" for g in costs}
    assert auto.back_off(table, costs, top) is None


def test_block_grain_groups_a_unet_block():
    assert auto.group_of("hg.down_blocks.2.layers.1.conv2", "block") == "unet1/hg.down_blocks.2"
    assert auto.group_of("hg.down_blocks.2.adapters_skip.1.adapter_conv", "block") == "unet1/hg.down_blocks.2"
    assert auto.group_of("hg.neck_block.layers.0.conv1", "block") == "unet0/hg.neck"
    assert auto.group_of("linears.1.conv", "block") == "head1"
    assert auto.group_of("features.conv0", "block") == "features.conv0"


def _mixed(model):
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    inner = [n for n in names if "conv1" in n and n != "features.conv0"]
    return {inner[0]: "int4", inner[1]: "float"}, inner


def test_quantize_model_holds_int4_int8_and_float_convs():
    torch.manual_seed(0)
    model = CUNet(tiny_config()).eval()
    plan, inner = _mixed(model)
    qmodel = quantize_model(model, "int8-convin", plan)
    modules = dict(qmodel.named_modules())
    assert isinstance(modules[inner[0]].weight_quantizer, BlockQuantizer)
    assert modules[inner[0]].input_quantizer is not None
    assert modules[inner[1]].weight_quantizer is None and modules[inner[1]].input_quantizer is None
    assert isinstance(modules[inner[2]].weight_quantizer, IntQuantizer)
    assert qmodel.layer_formats == plan
    with pytest.raises(Exception, match="not a conv of this model"):
        quantize_model(model, "int8", {"nope.conv": "int4"})
    with pytest.raises(Exception, match="int8 base scheme"):
        quantize_model(model, "int4", plan)


@pytest.mark.parametrize("int4_block", [None, 32])
def test_mixed_plan_reloads_from_a_qat_checkpoint(tmp_path, int4_block):
    """Per-channel (the CPU's) and block INT4 plans reload with their granularity; a plan
    checkpoint written before the checkpoint recorded it was block INT4 and reloads as such."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from cunet_optimize.quant import calibrate
    from cunet_optimize.quant.qat import load_qat_checkpoint, save_qat_checkpoint

    torch.manual_seed(0)
    model = CUNet(tiny_config()).eval()
    plan, inner = _mixed(model)
    qmodel = quantize_model(model, "int8-convin", plan, int4_block)
    x = torch.rand(2, 3, 64, 64)
    calibrate(qmodel, [x], "max", progress=False)
    path = save_qat_checkpoint(qmodel.eval(), tmp_path / "mixed.safetensors")
    again = load_qat_checkpoint(path)
    assert again.layer_formats == plan and again.int4_block == int4_block
    quantizer = dict(again.named_modules())[inner[0]].weight_quantizer
    assert type(quantizer) is (IntQuantizer if int4_block is None else BlockQuantizer) and quantizer.num_bits == 4
    with torch.no_grad():
        assert torch.equal(again(x)[-1], qmodel(x)[-1])
    if int4_block is None:
        return
    with safe_open(str(path), framework="pt") as f:
        meta, state = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    del meta["int4_block"]  # as `qat --plan` wrote it before per-channel INT4
    save_file(state, tmp_path / "older.safetensors", metadata=meta)
    older = load_qat_checkpoint(tmp_path / "older.safetensors")
    assert older.int4_block == auto.DEFAULT_INT4_BLOCK == 32
    with torch.no_grad():
        assert torch.equal(older(x)[-1], qmodel(x)[-1])


# --------------------------------------------------------------------------------------
# End to end (slow): build --precision auto on a tiny model


def auto_args(tiny, faces, workdir, *extra):
    return [*tiny_auto_args(tiny, faces, workdir), "--json", *extra]


@pytest.mark.slow
def test_auto_build_records_plan_and_packs_int4(auto_build):
    """The session's auto build (conftest.py): a budget of 100 points, no gate."""
    manifest, out = auto_build.manifest, auto_build.out
    assert out == auto_build.workdir / "engines" / "tiny-auto-cpu"
    a = json.loads((out / "build.json").read_text())["auto"]
    assert manifest["auto"] == a and manifest["precision"] == "auto"
    timings = manifest["timings_seconds"]  # the search's stages beside the final build's
    assert {"calibrate", "sensitivity", "search", "export", "accuracy"} <= set(timings)
    assert timings["sensitivity"] >= a["sensitivity"]["seconds"]
    assert set(a["plan"].values()) <= set(a["formats"]) == {"int4", "int8", "float"}
    assert a["predicted_degradation"] <= 100 and not a["back_off"]
    held = a["heldout"]
    assert held["first"] >= held["scale_images"]  # the sensitivity images never set a scale
    # the tiny set holds out fewer images than the default sensitivity's: both on all of them
    assert held["images"] < auto.DEFAULT_SENSITIVITY_IMAGES
    assert held["sensitivity_images"] == held["images"] == a["sensitivity"]["images"]
    assert held["fp32"] == a["sensitivity"]["fp32"]
    for layer in a["layers"]:
        if layer["role"] in ("stem", "last_head"):
            assert layer["format"] != "int4"
    # a huge budget: every conv that may take INT4 and is smaller for it does (not the inner 1x1
    # convs of this tiny model, whose kept BatchNorm outweighs half their few weights); on the CPU
    # they run on the integer path as the INT8 convs they equal (per-channel INT4 integers), and
    # the engine measured whether to store them packed
    infos = [auto.LayerInfo(x["name"], x["group"], x["role"], tuple(x["weight_shape"]), x["macs"]) for x in a["layers"]]
    smaller = {i.name for i in infos if i.role not in auto.EDGE_ROLES
               and auto.layer_cost(i, "int4", "size", int4_block=a["int4_block"]) < auto.layer_cost(i, "int8", "size")}
    assert a["int4_block"] is None and 0 < len(smaller) < len(infos) - 2
    assert {c for c, f in a["plan"].items() if f == "int4"} == smaller
    graph = onnx.load(out / "model.onnx")
    assert "integer_dataflow" in manifest["surgery"]["passes"]
    small = [i for i in graph.graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4
             and -8 <= onnx.numpy_helper.to_array(i).min() and onnx.numpy_helper.to_array(i).max() <= 7]
    assert small  # (the plan also names the convs of heads the export leaves out)
    storage = manifest["engine_settings"]["weight_storage"]
    assert storage["packed_initializers"] >= len(small) > 0 and storage["chosen"] in ("packed-int4", "int8")
    # the INT8 convs beside them (stem, last head) store INT8 integers, not float weights
    assert not [i.name for i in graph.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 4
                and not i.name.endswith("_scale")]
    assert a["weight_bytes"] < a["weight_bytes_uniform"]["int8"]
    assert a["sensitivity"]["delta"] and a["visited"]
    # what the search tried is recorded: the grain and why, the additive plan, the joint runs
    assert a["grain"] == "conv" and a["grain_reason"] == f"{len(a['layers'])} convs <= {auto.CONV_GRAIN_LIMIT}"
    assert a["joint_runs"][0]["moves"] is None and a["joint_runs"][0]["cost"] == a["additive"]["cost"]
    assert a["builds"][0]["heldout_degradation"] == a["heldout_degradation"] <= 100


@pytest.mark.slow
def test_auto_build_backs_off_when_the_prediction_is_too_optimistic(tiny, faces, tmp_path, monkeypatch, capsys):
    """A forced case: the prediction says everything is free, the first engine fails the gate."""
    import importlib

    build_module = importlib.import_module("cunet_optimize.pipeline.build")
    from cunet_optimize.cli import main

    monkeypatch.setattr(auto, "predict_degradation", lambda table, plan: 0.0)
    real_gate, calls = build_module._accuracy_gate, []

    def gate(*args, **kwargs):
        result = real_gate(*args, **kwargs)
        calls.append(result)
        result["passed"] = len(calls) > 1  # the first (all-cheapest) engine is "too inaccurate"
        return result

    monkeypatch.setattr(build_module, "_accuracy_gate", gate)
    assert main(auto_args(tiny, faces, tmp_path, "--max-nme-increase", "0.1", "--auto-sensitivity-images", "2")) == 0
    a = json.loads(capsys.readouterr().out)["auto"]
    # sensitivity on the first 2 held-out images, the joint runs on all of them
    assert a["sensitivity"]["images"] == a["heldout"]["sensitivity_images"] == 2 < a["heldout"]["images"]
    assert a["heldout"]["fp32"] != a["sensitivity"]["fp32"]  # the joint runs' own FP32 reference
    assert len(calls) == 2 and len(a["builds"]) == 2 and len(a["back_off"]) == 1
    assert not a["builds"][0]["passed"] and a["builds"][1]["passed"]
    assert a["builds"][1]["weight_bytes"] > a["builds"][0]["weight_bytes"]  # one group raised
    assert "raise" in a["back_off"][0]["action"]


@pytest.mark.slow
def test_plan_reloads_into_qat_and_build(tiny, faces, auto_build, tmp_path, capsys):
    """build --precision auto (the session's, read only) -> qat --plan (fine-tunes the mixed
    model) -> build --precision auto --qat."""
    from cunet_optimize.cli import main
    from cunet_optimize.quant.qat import load_qat_checkpoint

    searched = auto_build.manifest["auto"]
    plan = {c: f for c, f in searched["plan"].items() if f != "int8"}
    build_dir = auto_build.out
    qat = ["qat", "--model", str(tiny), "--plan", str(build_dir), "--data", str(faces), "--out",
           str(tmp_path / "qat"), "--epochs", "1", "--lr", "1e-4", "--batch-size", "4", "--calib-images", "3",
           "--val-split", "none", "--threads", "1", "--json"]
    assert main(qat) == 0
    summary = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))
    assert summary["best_val_nme_percent"] is None  # no validation split: nothing was validated
    ckpt = summary["qat_checkpoint"]
    # the CPU plan's INT4 is per output channel (quant.policy.int4_block_for): QAT fine-tuned
    # that, not blocks, and the checkpoint says so
    assert searched["int4_block"] is None
    tuned = load_qat_checkpoint(ckpt)
    assert tuned.layer_formats == plan and tuned.int4_block is None
    assert tuned.checkpoint_metadata["int4_block"] == "null"
    int4_quantizers = [m.weight_quantizer for n, m in tuned.named_modules() if tuned.layer_formats.get(n) == "int4"]
    assert int4_quantizers and all(type(q) is IntQuantizer and q.num_bits == 4 for q in int4_quantizers)
    assert main(["build", "--precision", "auto", "--qat", ckpt, "--model", str(tiny), "--eval-data", str(faces),
                 "--no-accuracy-gate", "--workdir", str(tmp_path / "w"), "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["calibration"]["method"] == "qat" and manifest["engine_built"]
    # build.json records the fine-tuned plan as the search recorded it: per conv, with its bytes
    a = manifest["auto"]
    assert a["source"] == "qat checkpoint" and a["plan"] == searched["plan"] and a["int4_block"] is None
    assert a["layers"] == searched["layers"]
    assert a["weight_bytes"] == searched["weight_bytes"] < a["weight_bytes_uniform"]["int8"]
    # ... and runs its INT4 convs on the integer path, their integers in INT4's range
    assert "integer_dataflow" in manifest["surgery"]["passes"]
    graph = onnx.load(tmp_path / "w" / "engines" / "tiny-auto-cpu" / "model.onnx").graph
    assert [i for i in graph.initializer if i.data_type == onnx.TensorProto.INT8 and len(i.dims) == 4
            and -8 <= onnx.numpy_helper.to_array(i).min() and onnx.numpy_helper.to_array(i).max() <= 7]
    # per-channel INT4 is the CPU's: a TensorRT target's INT4 is block-wise, refused in one line
    status = main(["build", "--precision", "auto", "--qat", ckpt, "--model", str(tiny), "--target", "h100",
                   "--eval-data", str(faces), "--no-accuracy-gate", "--workdir", str(tmp_path / "w2")])
    assert status == 2 and "per output channel" in capsys.readouterr().err
    # a plain int8 QAT checkpoint is not an auto plan
    assert main(["qat", "--model", str(tiny), "--plan", str(tmp_path / "nothing"), "--data", str(faces),
                 "--out", str(tmp_path / "q2")]) != 0
    assert "no auto plan here" in capsys.readouterr().err


def test_formats_worth_measuring_drops_dominated_formats():
    formats = ("int4", "int8", "float")
    assert auto.formats_worth_measuring(formats, LAYERS, "size", 0.01, 0.1) == ("int4", "int8")
    assert auto.formats_worth_measuring(formats, LAYERS, "size", 0.2, 0.1) == formats
    assert auto.formats_worth_measuring(formats, LAYERS, "latency", 0.01, 0.1) == ("int8",)
    assert auto.formats_worth_measuring(formats, LAYERS, "latency", 0.2, 0.1) == ("int8", "float")


@pytest.mark.slow
def test_prefix_cache_gives_the_same_sensitivity_as_full_forwards(faces):
    """Replaying the convs before a variant's first changed conv is exact, not an approximation."""
    from cunet_optimize.quant import calibrate
    from cunet_optimize.tasks import FACE, open_dataset

    torch.manual_seed(0)
    model = create_model("cunet-face-small", width=8, growth_rate=4, neck_size=2).eval()
    dataset = open_dataset(FACE, faces, None)
    # two images: exactness does not depend on how many (full forwards per variant are the cost)
    heldout = auto.HeldOut.load(dataset, range(2))
    qmodel = quantize_model(model, "int8-convin")
    calibrate(qmodel, [heldout.images], "max", progress=False)
    qmodel.eval()
    layers = auto.layer_infos(qmodel, "conv", tuple(heldout.images.shape[-2:]))
    args = (model, qmodel, heldout, layers, ("int4", "int8", "float"), "conv", False)
    switch = auto.FormatSwitch(qmodel, heldout, layers)
    cached = auto.measure_sensitivity(*args, switch=switch)
    full = auto.measure_sensitivity(*args, prefix_cache_bytes=0)
    assert cached.delta == full.delta and cached.int8 == full.int8
    assert any(d.get("int4", 0) != 0 for d in full.delta.values())
    # both grains were replayed: whole U-Nets before a change in a later one, and single convs
    cache = switch.cache
    assert len(cache.unet_ends) == model.config.num_unets >= 2 and cache.kept == cache.order
    assert layers[-1].role == "last_head" and cache.replayed_unets(len(layers) - 1) == model.config.num_unets
    assert cache.replayed_unets(cache.unet_ends[0] - 1) == 0 and cache.replayed_unets(cache.unet_ends[0]) == 1


def test_measurement_layout_is_channels_last_inside_and_restored_after(faces):
    from cunet_optimize.tasks import FACE, open_dataset

    torch.manual_seed(0)
    model = create_model("cunet-face-small", width=8, growth_rate=4, neck_size=2).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    heldout = auto.HeldOut.load(open_dataset(FACE, faces, None), range(4))
    assert heldout.first(2).images.is_contiguous(memory_format=torch.channels_last)
    assert len(heldout.first(2)) == 2 and heldout.first(2).landmarks.shape[0] == 2
    contiguous = heldout.metric(model)
    conv = model.features.conv0.weight
    with auto.measurement_layout(model):
        assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
        channels_last = heldout.metric(model)
    assert conv.is_contiguous()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) and after[k].is_contiguous() for k in before)
    # the same float network: the layouts differ by float32 summation order only
    assert channels_last == pytest.approx(contiguous, rel=1e-3)


# --------------------------------------------------------------------------------------
# Joint held-out runs (search_measured)

MANY = [_layer(f"c{i}", f"c{i}", (16 * (1 + i % 3), 32, 3, 3)) for i in range(12)]


def _joint_case(noise=0.04, true=0.01):
    """Each conv truly costs `true` points at INT4 and interactions are nil; each single-group
    measurement carries +-`noise` (alternating), so the clamped additive sum overstates plans."""
    table = _table({layer.group: {"int8": 0.0, "int4": true + (noise if i % 2 else -noise)}
                    for i, layer in enumerate(MANY)}, int8_degradation=0.0)
    costs = auto.group_costs(MANY, ("int4", "int8"), "size")

    def measure(plan):
        return sum(true for f in plan.values() if f == "int4")
    return table, costs, measure


def test_lowering_moves_follow_the_knapsack_order_and_skip_done_groups():
    table, costs, _ = _joint_case()
    start = {g: "int8" for g in costs}
    moves = auto.lowering_moves(table, costs, start)
    assert sorted(g for g, _ in moves) == sorted(costs) and {f for _, f in moves} == {"int4"}
    ratios = [(auto.expected_delta(table, g, f)) / (costs[g]["int8"] - costs[g][f]) for g, f in moves]
    assert ratios == sorted(ratios)
    plan = auto.plan_after(dict(start, c0="int4"), costs, [("c0", "int4"), ("c1", "int4")])
    assert plan["c0"] == plan["c1"] == "int4" and plan["c2"] == "int8"


@pytest.mark.parametrize("budget", [0.0, 0.035, 0.06, 1.0])
def test_search_measured_keeps_the_cheapest_plan_measured_within_the_budget(budget):
    table, costs, measure = _joint_case()
    additive = auto.search_plan(table, costs, budget)
    calls = []
    result = auto.search_measured(table, costs, budget, lambda p: calls.append(dict(p)) or measure(p), additive)
    assert result["feasible"] and measure(result["plan"]) == result["measured"] <= budget + 1e-12
    assert all(f in costs[g] for g, f in result["plan"].items())
    assert result["cost"] == auto.plan_cost(costs, result["plan"])
    if measure(additive.plan) <= budget:  # else the additive plan was too optimistic
        assert result["cost"] <= additive.cost
    # every plan measured is recorded, and bisection keeps the runs near log2(moves)
    assert len(result["runs"]) == len(calls) <= 2 + math.ceil(math.log2(len(MANY) + 1))
    assert result["runs"][0]["moves"] is None and result["runs"][0]["cost"] == additive.cost
    # it is the cheapest of the plans it measured that fit
    assert result["cost"] == min(r["cost"] for r in result["runs"] if r["measured"] <= budget)


def test_search_measured_beats_a_pessimistic_additive_prediction():
    """Twelve clamped single-group noises add up to 0.24 points of nothing: the joint runs
    see that taking every move costs 0.12 and fit far more INT4 into the budget."""
    table, costs, measure = _joint_case()
    additive = auto.search_plan(table, costs, 0.1)
    result = auto.search_measured(table, costs, 0.1, measure, additive)
    n_int4 = sum(f == "int4" for f in result["plan"].values())
    assert n_int4 == 10 > sum(f == "int4" for f in additive.plan.values())


def test_search_measured_falls_back_to_the_additive_plan_when_nothing_fits():
    table, costs, _ = _joint_case()
    additive = auto.search_plan(table, costs, 0.1)
    result = auto.search_measured(table, costs, 0.1, lambda plan: 1.0, additive)
    assert not result["feasible"] and result["plan"] == additive.plan and result["measured"] == 1.0


def test_format_switch_gives_the_rebuilt_mixed_model_exactly(faces):
    """A plan run by swapping quantizers in place scores as the model `build` exports for it."""
    from cunet_optimize.quant import calibrate
    from cunet_optimize.tasks import FACE, open_dataset

    torch.manual_seed(0)
    model = create_model("cunet-face-small", width=8, growth_rate=4, neck_size=2).eval()
    heldout = auto.HeldOut.load(open_dataset(FACE, faces, None), range(6))
    qmodel = quantize_model(model, "int8-convin")
    calibrate(qmodel, [heldout.images[:4]], "max", progress=False)
    qmodel.eval()
    layers = auto.layer_infos(qmodel, "conv", tuple(heldout.images.shape[-2:]))
    inner = [layer.name for layer in layers if layer.role not in auto.EDGE_ROLES]
    plan = {**{n: "int4" for n in inner[::2]}, inner[1]: "float"}
    switch = auto.FormatSwitch(qmodel, heldout, layers)
    int8 = switch.record_int8()
    assert switch.metric(plan) == heldout.metric(auto.with_layer_formats(qmodel, plan))
    assert switch.metric({}) == int8 == heldout.metric(qmodel)  # every quantizer put back
