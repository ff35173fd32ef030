"""The HTML report: one self-contained, well-formed page with the tables and plots a
reader needs, for one variant, for many, and compared with another profile."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import pytest

from cunet_optimize.errors import CUNetError
from cunet_optimize.manifests.profile import BUNDLE_ONLY_STATUS, read_profile
from cunet_optimize.manifests.profile import VariantRecord
from cunet_optimize.profiling.result import profile_manifest, speedups, variant_record, what_ran_where
from cunet_optimize.report import render_html, write_report
from cunet_optimize.report.svg import nice_ticks, pareto_front

ENV = {"cpu": "Test CPU 9000", "cpu_cores": 2, "cpu_cores_usable": 2, "gpu": "none", "os": "Linux",
       "python": "3.11.7", "memory_total_bytes": 8 << 30,
       "versions": {"torch": "2.13.0", "onnxruntime": "1.32.0", "onnx": "1.23.2"}, "load_average": [0.5, 0.4, 0.3]}
DATA = {"folder": "/data/300w", "split": "test", "crop": "tight", "images": 689, "normalizer": "inter_ocular",
        "flip": False, "crop_policy": "tight: ground-truth landmark box x1.25 (HRNet)"}


def latency(median: float, batch: int = 1) -> dict:
    return {"batch_size": batch, "runs": 50, "warmup": 10, "median_ms": median, "p90_ms": median * 1.1,
            "p95_ms": median * 1.15, "p99_ms": median * 1.3, "mean_ms": median * 1.02, "min_ms": median * 0.9,
            "max_ms": median * 1.5, "std_ms": 0.1, "per_image_ms": median / batch,
            "throughput_ips": 1000 * batch / median}


def accuracy(nme: float, ref: float, tol: float = 0.1) -> dict:
    thresholds = [i / 1000 for i in range(101)]
    return {"metrics": {"nme_percent": nme, "count": 689, "normalizer": "inter_ocular",
                        "failure_rate_0.08_percent": 1.0, "failure_rate_0.10_percent": 0.5, "auc_0.08_percent": 60.0},
            "runtime": "rt", "reference": "pytorch-fp32", "reference_nme_percent": ref,
            "nme_delta_points": nme - ref, "nme_delta_relative_percent": 100 * (nme - ref) / ref,
            "tolerance_points": tol, "tolerance_source": "build.json accuracy.tolerance",
            "passed": nme - ref <= tol,
            "ced": {"max_threshold": 0.1, "auc_threshold": 0.08, "thresholds": thresholds,
                    "fraction": [min(1.0, (t / (nme / 100)) ** 2 / 2) for t in thresholds]}}


def variant(name: str, median: float | None, nme: float | None, precision="int8", backend="onnxruntime",
            role="engine", **extra) -> VariantRecord:
    """A row as the profiler fills it, from plain data (`extra`: more fields, e.g. layers)."""
    measured = median is not None
    fields = dict(
        name=name, role=role, precision=precision, target="cpu", backend=backend, backend_version="1.32.0",
        runtime=f"{backend} runtime of {name}", status="measured" if measured else BUNDLE_ONLY_STATUS,
        measured=measured, model_sha256="ab" * 32, build_dir=f"/w/engines/{name}", engine_built=measured,
        command=f"cunet-optimize build --name {name}",
        size={"artifacts": {"onnx": 2_000_000}, "total_bytes": 3_000_000, "engine_bytes": 1_500_000,
              "deploy_artifact": "engine", "deploy_bytes": 1_500_000,
              "weights": {"total_bytes": 1_000_000, "total_elements": 250_000,
                          "by_dtype": {"int8": {"tensors": 10, "elements": 250_000, "bytes": 250_000}}}},
    )
    if measured:
        fields["latency"] = latency(median)
        fields["batch_sweep"] = [latency(median), latency(median * 1.6, 2)]
        fields["memory"] = {"peak_rss_bytes": 300 << 20, "baseline_rss_bytes": 250 << 20,
                            "inference_growth_bytes": 50 << 20, "method": "test method"}
    if nme is not None:
        fields["accuracy"] = accuracy(nme, 3.0)
    return variant_record(**fields, **extra)


LAYERS = {"source": "ONNX Runtime profiler", "runs": 10, "nodes": 40, "total_ms_per_run": 5.0, "batch_size": 1,
          "by_op_type": [{"op_type": "Conv", "nodes": 30, "ms_per_run": 4.0, "percent": 80.0},
                         {"op_type": "Concat", "nodes": 10, "ms_per_run": 1.0, "percent": 20.0}],
          "top_nodes": [{"node": "/hg/down_blocks.0/conv", "op_type": "Conv", "ms_per_run": 1.2, "percent": 24.0}]}
SURGERY = {"passes": ["fold_dense_concat"],  # as pipeline/build.py writes it: names + one report per pass
           "reports": [{"name": "fold_dense_concat", "nodes_before": 812, "nodes_after": 640, "concats_before": 96,
                        "concats_after": 12, "concat_bytes_before": 4 << 20, "concat_bytes_after": 1 << 20,
                        "rewrites": 84, "notes": [], "verification": None}],
           "peak_activation_bytes_before": 48 << 20, "peak_activation_bytes_after": 20 << 20,
           "concat_bytes_before": 30 << 20, "concat_bytes_after": 8 << 20}
CALIBRATION = {"method": "entropy", "images": 64, "scales_file": "calib/scales.json",
               "ranges": {"stem.conv.input": 1.0, "hg.down.0.concat": 6.25}}
BUILD_GATE = {"runtime": "ONNX Runtime 1.32 CPU (ORT_DISABLE_ALL reference)", "reference": {"nme_percent": 3.0},
              "quantized": {"nme_percent": 3.04}, "nme_increase_percent_points": 0.04, "tolerance": 0.1,
              "passed": True}


# profile --serve's rows of a CPU build, as serving/served_latency.py writes them (numbers made up)
SERVED = {"triton": "2.51.0", "image_batch": 1, "seconds": 5.0, "rows": [
    {"runner": "in-process ONNX Runtime", "concurrency": 1, "p50_ms": 10.0, "p99_ms": 12.0,
     "throughput_infer_per_s": 99.0, "requests": 495},
    {"runner": "in-process ONNX Runtime", "concurrency": 8, "p50_ms": 80.0, "p99_ms": 95.0,
     "throughput_infer_per_s": 98.0, "requests": 490},
    {"runner": "Triton http (perf_analyzer)", "concurrency": 1, "p50_ms": 14.5, "p99_ms": 17.0,
     "throughput_infer_per_s": 68.0, "server_queue_ms": 0.1, "server_compute_ms": 11.0,
     "executions_by_batch_size": {"1": 340}},
    {"runner": "Triton grpc (perf_analyzer)", "concurrency": 8, "p50_ms": 70.0, "p99_ms": 90.0,
     "throughput_infer_per_s": 108.5, "server_queue_ms": 30.0, "server_compute_ms": 40.0,
     "executions_by_batch_size": {"2": 10, "8": 26, "10": 1}}]}


def make_profile(variants: list[VariantRecord], name: str = "p1", data: dict | None = DATA) -> dict:
    speedups(variants)
    return profile_manifest(
        name=name, created="2026-01-01T00:00:00+00:00", environment=ENV,
        settings={"runs": 50, "warmup": 10, "batch_sizes": [1, 2], "sweep_runs": "50 at batch 1",
                  "timing": "backend call", "memory_method": "test method"},
        data=data, variants=variants,
        commands={"builds": [{"name": v.name, "command": v.command} for v in variants if v.role == "engine"],
                  "profile": "cunet-optimize profile --runs 50"},
        statement=what_ran_where(ENV, variants), notes=["a note for the reader"], seconds=12.0,
        toolkit_version="0.1.0",
    ).to_dict()


def full_profile(extra_variants: int = 0, name: str = "p1", int8_ms: float = 10.0) -> dict:
    vs = [
        variant("pytorch-fp32", 40.0, 3.0, precision="fp32", backend="pytorch", role="baseline"),
        variant("cunet-fp32-cpu", 20.0, 3.01, precision="fp32", layers=LAYERS),
        variant("cunet-int8-cpu", int8_ms, 3.05, layers=LAYERS, surgery=SURGERY, calibration=CALIBRATION,
                build_accuracy=BUILD_GATE, served=SERVED),
        variant("cunet-int8-jetson-orin-nano", None, None, backend="tensorrt"),
    ]
    for i in range(extra_variants):
        vs.append(variant(f"cunet-int4-variant-{i}", 8.0 + i, 3.2 + 0.1 * i, precision="int4", layers=LAYERS))
    return make_profile(vs, name)


# ------------------------------------------------------------------ HTML checks


# SVG elements written self-closed (<line .../>) arrive through handle_startendtag.
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class StructureChecker(HTMLParser):
    """Every opened element is closed in order; counts tags; collects table header texts."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.counts: dict[str, int] = {}
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        key = f"svg:{tag}" if "svg" in self.stack else tag  # SVG has its own <title> elements
        self.counts[key] = self.counts.get(key, 0) + 1
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.counts[tag] = self.counts.get(tag, 0) + 1

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
            return
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def check_structure(page: str) -> StructureChecker:
    checker = StructureChecker()
    checker.feed(page)
    checker.close()
    assert checker.errors == [] and checker.stack == []
    for tag in ("html", "head", "body", "title", "style"):
        assert checker.counts.get(tag) == 1, tag
    return checker


def assert_self_contained(page: str) -> None:
    lowered = page.lower()
    # no URLs of any kind, not even an SVG namespace (the word http may name a protocol: the served table)
    assert "http:" not in lowered and "https:" not in lowered
    for needle in ("<script", "src=", "url(", "@import", "<link", "<iframe", "<img", "//"):
        assert needle not in lowered, needle


def section_html(page: str, anchor: str) -> str:
    match = re.search(rf'<section id="{anchor}">(.*?)</section>', page, re.S)
    assert match, anchor
    return match.group(1)


# ------------------------------------------------------------------ tests


def test_one_variant_renders_without_plots_it_cannot_draw():
    page = render_html(make_profile([variant("pytorch-fp32", 40.0, None, precision="fp32", backend="pytorch",
                                             role="baseline")], data=None))
    checker = check_structure(page)
    assert_self_contained(page)
    assert checker.counts["table"] >= 1
    assert "pytorch-fp32" in section_html(page, "summary")
    assert "No variant has both a latency and an NME" in page
    assert 'id="surgery"' not in page and 'id="calibration"' not in page


def test_full_report_has_every_section():
    page = render_html(full_profile())
    checker = check_structure(page)
    assert_self_contained(page)
    for anchor in ("summary", "pareto", "ced", "accuracy", "latency", "served", "memory", "layers", "surgery",
                   "calibration", "environment", "reproduce", "notes"):
        assert f'<section id="{anchor}">' in page, anchor
        assert f'href="#{anchor}"' in page, anchor
    assert checker.counts["svg"] >= 4  # Pareto, CED, one bar chart per variant with layer times
    text = " ".join(checker.text)
    assert "TensorRT bundles were not built here" in text and "Test CPU 9000" in text


def test_the_served_section_shows_in_process_and_served_rows_side_by_side():
    page = render_html(full_profile())
    served = page[page.index('<section id="served">'):]
    served = served[:served.index("</section>")]
    rows = [r for r in served.split("<tr>")[2:]]
    assert len(rows) == 4 and all("cunet-int8-cpu" in r for r in rows)  # only the build that was served
    assert "in-process ONNX Runtime" in rows[0] and "Triton grpc (perf_analyzer)" in rows[3]
    assert "108.5" in rows[3] and "2: 10, 8: 26, 10: 1" in rows[3]  # the batcher's work, by batch size in order
    assert "Triton 2.51.0" in served and "5.0 s" in served
    without = full_profile()
    for v in without["variants"]:
        v.pop("served", None)
    assert 'id="served"' not in render_html(without)  # a profile without --serve (or an older one) has none


def test_summary_table_numbers():
    page = render_html(full_profile())
    summary = section_html(page, "summary")
    row = re.search(r"<tr>(?:(?!</tr>).)*cunet-int8-cpu.*?</tr>", summary, re.S).group(0)
    assert "10.0 / 11.0" in row  # median / p90 ms
    assert "4.00x" in row and "2.00x" in row  # vs PyTorch 40 ms, vs ONNX FP32 20 ms
    assert "3.050" in row and "+0.050" in row and "+1.7%" in row  # NME, delta points, relative
    assert "pass" in row and "1.4 MiB" in row
    bundle = re.search(r"<tr>(?:(?!</tr>).)*cunet-int8-jetson-orin-nano.*?</tr>", summary, re.S).group(0)
    assert "bundle only" in bundle and "FAIL" not in bundle and "x<" not in bundle


def test_surgery_and_calibration_summaries():
    page = render_html(full_profile())
    surgery = section_html(page, "surgery")
    for needle in ("fold_dense_concat", "812 → 640", "96 → 12", "48.0 MiB → 20.0 MiB", "30.0 MiB → 8.0 MiB", ">84<"):
        assert needle in surgery, needle
    brief_form = full_profile()
    brief_form["variants"][2]["surgery"] = {"passes": [SURGERY["reports"][0]]}  # passes as dicts
    assert "812 → 640" in section_html(render_html(brief_form), "surgery")
    calibration = section_html(page, "calibration")
    assert "entropy" in calibration and "hg.down.0.concat" in calibration and "6.2500" in calibration


def test_accuracy_settings_state_what_eval_md_requires():
    acc = section_html(render_html(full_profile()), "accuracy")
    for needle in ("/data/300w", "689", "tight: ground-truth landmark box", "inter_ocular", "Flip test", "off",
                   "0.100 NME points", "pytorch-fp32", "FP32 reference NME", "Δ (relative)",
                   "Accuracy gate recorded at build time", "ORT_DISABLE_ALL"):
        assert needle in acc, needle


def test_many_variants_all_in_table_plots_and_legend():
    profile = full_profile(extra_variants=8)
    page = render_html(profile)
    check_structure(page)
    names = [v["name"] for v in profile["variants"]]
    assert len(names) == 12
    summary = section_html(page, "summary")
    ced = section_html(page, "ced")
    pareto = section_html(page, "pareto")
    for name in names:
        assert name in summary
        if name != "cunet-int8-jetson-orin-nano":
            assert f">{name}</text>" in ced, name  # legend entry
            assert f">{name}</text>" in pareto, name  # point label
    assert ced.count("<polyline") == 11 and pareto.count("<circle") == 11


def test_compare_mode_shows_deltas_per_variant():
    now, before = full_profile(name="now", int8_ms=10.0), full_profile(name="before", int8_ms=12.5)
    before["variants"] = [v for v in before["variants"] if v["name"] != "cunet-fp32-cpu"]
    page = render_html(now, compare=before)
    check_structure(page)
    comp = section_html(page, "compare")
    int8 = re.search(r"<tr><td>cunet-int8-cpu</td>.*?</tr>", comp, re.S).group(0)
    assert "-2.50" in int8 and "-20.0%" in int8 and "+0.000" in int8
    fp32 = re.search(r"<tr><td>cunet-fp32-cpu</td>.*?</tr>", comp, re.S).group(0)
    assert "this profile only" in fp32
    assert "before" in comp and "now" in comp


def test_names_from_the_json_are_escaped():
    profile = full_profile()
    profile["variants"][1]["name"] = '<script>alert("x")</script>'
    profile["notes"] = ["see <b>this</b>"]
    page = render_html(profile)
    check_structure(page)
    assert "<script" not in page and "&lt;script&gt;" in page and "&lt;b&gt;this&lt;/b&gt;" in page


def test_a_sparse_profile_still_renders():
    """Older or hand-edited JSON with only names and a few numbers: dashes, not a crash."""
    sparse = {"schema": "cunet-optimize/profile/1",
              "variants": [{"name": "a"}, {"name": "b", "latency": {"median_ms": 3.0}}]}
    page = render_html(sparse, compare=sparse)
    check_structure(page)
    assert "—" in section_html(page, "summary")


def test_render_rejects_what_is_not_a_profile():
    with pytest.raises(CUNetError, match="schema"):
        render_html({"variants": []})
    with pytest.raises(CUNetError, match="compare profile"):
        render_html(full_profile(), compare={"schema": "nope"})


def test_write_report_writes_json_and_html_that_read_back(tmp_path):
    profile = full_profile()
    json_path, html_path = write_report(profile, tmp_path / "reports", "run-1")
    assert json_path == tmp_path / "reports" / "run-1.json" and html_path.suffix == ".html"
    assert read_profile(json_path).to_dict() == profile
    assert "cunet-optimize report" in html_path.read_text() and str(json_path) in html_path.read_text()
    assert sorted(p.name for p in (tmp_path / "reports").iterdir()) == ["run-1.html", "run-1.json"]


def test_write_report_writes_nothing_when_rendering_fails(tmp_path):
    with pytest.raises(CUNetError):
        write_report({"schema": "cunet-optimize/profile/1", "variants": "oops"}, tmp_path, "bad")
    assert list(tmp_path.iterdir()) == []


def test_profile_json_is_strict(tmp_path):
    profile = full_profile()
    profile["variants"][0]["latency"]["p99_ms"] = None  # NaN is written as null
    text = json.dumps(profile, allow_nan=False)
    assert "NaN" not in text
    nan_result = make_profile([variant("pytorch-fp32", float("nan"), 3.0, backend="pytorch", role="baseline")])
    assert nan_result["variants"][0]["latency"]["median_ms"] is None


def test_nice_ticks_and_pareto_front_by_hand():
    assert nice_ticks(0, 7.3) == [0, 2, 4, 6, 8]
    assert nice_ticks(0, 100) == [0, 20, 40, 60, 80, 100]
    # (latency, NME): (0.5, 9) fastest; (1, 5) and (2, 3) trade off; (3, 4) is beaten by (2, 3); (4, 1) best NME
    assert pareto_front([(1, 5), (2, 3), (3, 4), (0.5, 9), (4, 1)]) == [3, 0, 1, 4]


def _circle_ys(svg: str) -> list[float]:
    return [float(y) for y in re.findall(r'<circle cx="[^"]+" cy="([^"]+)"', svg)]


def test_latency_vs_nme_plot_draws_a_tiny_difference_as_a_sliver_not_a_cliff():
    """Two engines 0.00005 NME points apart: without a minimum span the y axis zooms to the
    data and draws them a plot's height apart; with the gate's tolerance as the span they
    sit within a pixel of each other."""
    from cunet_optimize.report.svg import scatter_svg

    fast, slow = variant("fast-int8", 5.0, 3.00000), variant("slow-fp32", 10.0, 3.00005, precision="fp32")
    page = render_html(make_profile([fast, slow]))
    ys = _circle_ys(section_html(page, "pareto"))
    assert len(ys) == 2 and abs(ys[0] - ys[1]) < 1.0
    pts = [{"x": 5.0, "y": 3.0, "label": "a", "colour": "#000"}, {"x": 10.0, "y": 3.00005, "label": "b",
                                                                    "colour": "#000"}]
    assert abs(_circle_ys(scatter_svg(pts, "ms", "NME", "t"))[0] - _circle_ys(scatter_svg(pts, "ms", "NME", "t"))[1]) > 200
    # a real difference (a gate's worth) still spreads over the plot
    ys = _circle_ys(scatter_svg([pts[0], dict(pts[1], y=3.1)], "ms", "NME", "t", y_min_span=0.1))
    assert abs(ys[0] - ys[1]) > 200


def test_auto_plan_section_maps_each_conv_and_scales_degradation_from_zero_to_the_budget():
    from cunet_optimize.report.auto_plan import search_points_svg

    auto = {"objective": "size", "grain": "conv", "budget": 0.1, "weight_bytes": 2000, "predicted_degradation": 0.05,
            "weight_bytes_uniform": {"int8": 3000},
            "plan": {"stem": "int8", "a": "int4", "b": "float"},
            "layers": [{"name": n, "format": f, "weight_bytes": 100} for n, f in
                       [("stem", "int8"), ("a", "int4"), ("b", "float")]],
            "visited": [{"step": "cheapest", "cost": 1000, "predicted": 0.05},
                        {"step": "raise a", "cost": 1500, "predicted": 0.05005}],
            "joint_runs": [{"moves": None, "cost": 1500, "predicted": 0.05, "measured": 0.03}],
            "heldout": {"images": 64, "sensitivity_images": 16},
            "builds": [{"step": 0, "formats": {"int4": 1}, "predicted": 0.05, "degradation": 0.04, "passed": True,
                        "weight_bytes": 1500}], "back_off": []}
    from cunet_optimize.manifests.build import AutoPlan
    from cunet_optimize.manifests.schema import from_dict

    svg = search_points_svg(from_dict(AutoPlan, auto, "auto", "test"))
    ys = _circle_ys(svg)
    assert len(ys) == 4 and abs(ys[0] - ys[1]) < 1.0  # 0.00005 apart: one pixel at most
    assert "budget 0.1" in svg and "held-out: 1500 B, +0.0300" in svg
    page = section_html(render_html(make_profile([variant("cunet-auto-cpu", 5.0, 3.0, precision="auto",
                                                          auto=auto)])), "auto-plan")
    assert page.count("<rect") >= 3 and "stem: int8" in page and "a: int4" in page
    assert "1 joint held-out run(s) on 64 images (sensitivity on 16)" in page
