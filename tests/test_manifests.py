"""The typed manifests (manifests/): build.json and the profile JSON read back into
dataclasses, written back unchanged, and refused in one line when the schema or a
field is wrong."""

from __future__ import annotations

import copy
import dataclasses
import json
import subprocess
import sys

import pytest

from cunet_optimize.manifests.build import BUILD_SCHEMA, BuildManifest, checked_build_json, read_build_manifest
from cunet_optimize.manifests.profile import ProfileManifest
from cunet_optimize.manifests.schema import ManifestError
from cunet_optimize.report import render_html
from test_report import full_profile

GATE = {"runtime": "ONNX Runtime CPU", "reference_runtime": "ONNX Runtime CPU (ORT_ENABLE_ALL) of the FP32 export",
        "data": {"images": 3}, "task": "face", "metric": "NME", "metric_key": "nme_percent",
        "higher_is_better": False, "reference": {"nme_percent": 3.1, "failure_rate_0.08_percent": 0.0},
        "quantized": {"nme_percent": 3.2, "failure_rate_0.08_percent": 0.0}, "reference_value": 3.1,
        "quantized_value": 3.2, "degradation_points": 0.1, "tolerance": 0.5, "tolerance_option": "--max-nme-increase",
        "passed": True, "gate_enforced": True}

AUTO = {"objective": "size", "budget": 0.3, "budget_option": "--max-nme-increase", "grain": "group",
        "plan": {"conv1": "int8", "conv2": "int4"}, "weight_bytes": 1200.0, "weight_bytes_uniform": {"int8": 2000.0},
        "predicted_degradation": 0.1, "back_off": [{"after_build": 0, "degradation": 0.4, "action": "conv2 -> int8"}],
        "layers": [{"name": "conv1", "group": "stem", "format": "int8", "weight_bytes": 800.0},
                   {"name": "conv2", "group": "u1", "format": "int4", "weight_bytes": 400.0}],
        "visited": [{"step": 0, "cost": 1200.0, "predicted": 0.1}],
        "builds": [{"step": 0, "formats": {"int8": 1, "int4": 1}, "predicted": 0.1, "degradation": 0.12,
                    "passed": True, "weight_bytes": 1200.0, "seconds": 3.0}],
        "search_seconds": 1.5}


def build_json() -> dict:
    """A build.json with every section pipeline/build.py writes (values shortened)."""
    return {
        "schema": BUILD_SCHEMA, "name": "tiny-int8-cpu", "toolkit_version": "0.1.0",
        "command": "cunet-optimize build --precision int8", "precision": "int8", "target": "cpu", "dla_core": None,
        "target_spec": {"name": "cpu", "backend": "onnxruntime"},
        "model": {"source": "embedded", "checkpoint": "/m.safetensors", "sha256": "ab" * 32, "config": {"width": 8}},
        "eval_data": {"folder": "/d", "split": "test", "images": 3, "crop": "tight", "task": "face"},
        "calibration": {"method": "max", "scheme": "int8", "images": 8, "data": "/d", "scales_file": "calib/x.json",
                        "ranges": {"conv1": 1.5}, "id": "x"},
        "export": {"opset": 17, "num_nodes": 100},
        "surgery": {"passes": ["cleanup"], "reports": [{"name": "cleanup", "rewrites": 2, "nodes_before": 10,
                                                        "nodes_after": 8, "seconds": 0.1}],
                    "peak_activation_bytes_before": 100, "peak_activation_bytes_after": 80,
                    "concat_bytes_before": 10, "concat_bytes_after": 5, "dense_concat_form": None,
                    "int8_cpu_form": None},
        "lint": [], "backend": "onnxruntime", "backend_version": "1.32.0", "engine_built": True,
        "engine_settings": {"intra_op_threads": 1}, "artifacts": {"onnx": "model.onnx", "model": "model.ort.onnx"},
        "accuracy": GATE, "timings_seconds": {"export": 0.5}, "notes": ["a note"], "auto": AUTO,
    }


def test_build_manifest_round_trips_and_types_what_the_profiler_reads(tmp_path):
    data = build_json()
    m = BuildManifest.from_dict(data)
    assert m.to_dict() == data  # nothing lost, nothing added (extra keys kept, absent keys stay absent)
    assert BuildManifest.from_dict(m.to_dict()) == m
    assert m.model.sha256 == "ab" * 32 and m.accuracy.tolerance == 0.5 and m.accuracy.key == "nme_percent"
    assert m.surgery.pass_records[0].nodes_after == 8 and m.calibration.ranges == {"conv1": 1.5}
    assert m.extra["lint"] == [] and m.extra["timings_seconds"] == {"export": 0.5}
    assert m.auto.layers[1].format == "int4" and m.auto.builds[0].passed is True
    path = tmp_path / "build.json"
    path.write_text(checked_build_json(data))
    assert read_build_manifest(path) == m and json.loads(path.read_text()) == data


def test_an_old_build_json_without_the_later_fields_still_loads():
    """build.json before the pose task: no metric_key, the degradation under its NME name."""
    data = build_json()
    for key in ("dla_core", "eval_data", "calibration", "surgery", "notes", "command", "toolkit_version"):
        del data[key]
    data["accuracy"] = {"reference": {"nme_percent": 3.0}, "quantized": {"nme_percent": 3.2},
                        "nme_increase_percent_points": 0.2, "tolerance": 0.5, "passed": True}
    m = BuildManifest.from_dict(data)
    assert m.accuracy.key == "nme_percent" and m.accuracy.worse_points == 0.2 and m.notes == []
    assert m.to_dict() == data


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(schema="cunet-optimize/build/0"),
     "b.json: schema 'cunet-optimize/build/0', expected 'cunet-optimize/build/1'; rebuild it"),
    (lambda d: d.pop("schema"), "b.json: schema None, expected 'cunet-optimize/build/1'"),
    (lambda d: d["model"].pop("sha256"), "b.json: missing field 'model.sha256'; rebuild it"),
    (lambda d: d["accuracy"].update(tolerance="0.5"), "b.json: accuracy.tolerance is str '0.5', expected a number;"),
    (lambda d: d["surgery"]["reports"][0].update(rewrites=2.5),
     "b.json: surgery.reports[0].rewrites is float '2.5', expected an integer;"),
    (lambda d: d.update(engine_built="yes"), "b.json: engine_built is str 'yes', expected true/false;"),
])
def test_a_wrong_build_json_is_one_line_naming_the_field(change, message):
    data = build_json()
    change(data)
    with pytest.raises(ManifestError) as err:
        BuildManifest.from_dict(data, "b.json")
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_the_build_writes_no_manifest_the_profiler_would_reject():
    data = build_json()
    data["artifacts"]["onnx"] = 3
    with pytest.raises(ManifestError, match=r"artifacts\.onnx is int '3', expected a string"):
        checked_build_json(data)


def test_profile_manifest_round_trips():
    data = full_profile()
    m = ProfileManifest.from_dict(data)
    assert m.to_dict() == data
    assert ProfileManifest.from_dict(m.to_dict()) == m
    int8 = next(v for v in m.variants if v.name == "cunet-int8-cpu")
    assert int8.latency.median_ms == 10.0 and int8.build_accuracy.passed is not None and int8.layers.by_op_type
    assert [r.concurrency for r in int8.served.rows] == [1, 8, 1, 8]
    assert int8.served.rows[3].executions_by_batch_size == {"2": 10, "8": 26, "10": 1}


def test_a_profile_from_before_profile_serve_still_reads():
    data = full_profile()
    for v in data["variants"]:
        v.pop("served", None)
    assert all(v.served is None for v in ProfileManifest.from_dict(data).variants)
    bad = copy.deepcopy(full_profile())
    bad["variants"][2]["served"]["rows"][0]["concurrency"] = "eight"
    with pytest.raises(ManifestError, match=r"variants\[2\]\.served\.rows\[0\]\.concurrency is str 'eight'"):
        ProfileManifest.from_dict(bad, "p.json")


def test_a_profile_of_another_schema_or_type_is_refused_in_one_line():
    data = full_profile()
    with pytest.raises(ManifestError, match=r"^p.json: schema 'cunet-optimize/profile/0', expected "
                                            r"'cunet-optimize/profile/1'; re-run `cunet-optimize profile`"):
        ProfileManifest.from_dict({**data, "schema": "cunet-optimize/profile/0"}, "p.json")
    bad = copy.deepcopy(data)
    bad["variants"][2]["layers"]["by_op_type"][0]["ms_per_run"] = "slow"
    with pytest.raises(ManifestError, match=r"^p.json: variants\[2\]\.layers\.by_op_type\[0\]\.ms_per_run is str "
                                            r"'slow', expected a number; re-run"):
        ProfileManifest.from_dict(bad, "p.json")


def _without_extra(value):
    """The JSON with every key the typed model does not declare removed (auto stays: typed as a dict)."""
    if dataclasses.is_dataclass(value):
        return {f.metadata.get("key", f.name): _without_extra(getattr(value, f.name))
                for f in dataclasses.fields(value) if f.name != "extra"}
    if isinstance(value, dict):
        return {k: _without_extra(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_extra(v) for v in value]
    return value


def test_every_field_the_report_reads_is_typed():
    """The page rendered from only the declared fields equals the page from the whole JSON:
    the report reads nothing the schema check did not check."""
    data = full_profile(extra_variants=1)
    data["variants"][2]["auto"] = AUTO
    stripped = _without_extra(ProfileManifest.from_dict(data))
    assert stripped != data  # the fixture does carry undeclared keys (e.g. latency std_ms), so this can fail
    assert "std_ms" not in json.dumps(stripped) and "std_ms" in json.dumps(data)
    assert "search_seconds" not in json.dumps(stripped)
    page = render_html(data)
    assert "Mixed precision" in page and "Per-layer time" in page and "Graph surgery" in page  # all sections drawn
    assert render_html(stripped) == page


def test_manifests_import_without_torch_or_numpy():
    code = ("import sys, cunet_optimize.manifests.build, cunet_optimize.manifests.profile\n"
            "heavy = sorted(m for m in ('torch', 'numpy', 'onnx', 'onnxruntime') if m in sys.modules)\n"
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
