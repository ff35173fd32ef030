"""The profile report as ONE self-contained HTML file: inline CSS, inline SVG, no scripts.

`render_html(profile, compare=None)` turns a profile (manifests/profile.py: the typed
form of its JSON; a dict is checked into it first) into a page a person reads on a laptop: what ran where, the summary
table, the latency-vs-NME Pareto plot, CED curves, batch sweep, memory and size,
per-layer time, accuracy settings and deltas, surgery and calibration summaries,
environment and the commands to reproduce. With `compare` (a second profile) it adds
a table of latency and NME changes per variant. Every string from the JSON is
escaped; the page references nothing outside itself.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

from cunet_optimize.manifests.profile import Memory, ProfileManifest, Size, Weights, as_profile, summary_rows
from cunet_optimize.metrics import DEFAULT_TOLERANCE_POINTS
from cunet_optimize.report.format import (
    MISSING,
    fmt_bytes,
    fmt_ms,
    fmt_num,
    fmt_pass,
    fmt_speedup,
)
from cunet_optimize.report.markup import esc, figure, section, table
from cunet_optimize.report.svg import colour, hbars_svg, lines_svg, scatter_svg

TOP_LAYERS = 15
CALIBRATION_ROWS = 12

CSS = """
:root { --fg:#1d2330; --muted:#5b6475; --line:#d9dde5; --bg:#ffffff; --band:#f5f7fa;
        --pass:#1a7f37; --fail:#c62828; --warn:#9a6700; --accent:#1f4f99; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg);
       font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1320px; margin: 0 auto; padding: 20px 28px 60px; }
h1 { font-size: 24px; margin: 8px 0 4px; }
h2 { font-size: 19px; margin: 34px 0 10px; padding-bottom: 4px; border-bottom: 2px solid var(--line); }
h3 { font-size: 15px; margin: 20px 0 8px; }
p { margin: 6px 0; }
nav { font-size: 13px; margin: 10px 0 4px; }
nav a { color: var(--accent); margin-right: 12px; text-decoration: none; white-space: nowrap; }
.muted { color: var(--muted); fill: var(--muted); }
.statement { background: #eef4ff; border-left: 4px solid var(--accent); padding: 10px 14px; margin: 14px 0; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: 6px 0 10px; font-size: 13px; }
th, td { border: 1px solid var(--line); padding: 4px 8px; vertical-align: top; }
th { background: var(--band); text-align: left; font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
td.num { white-space: nowrap; }
td.small { font-size: 12px; color: var(--muted); max-width: 300px; overflow-wrap: anywhere; }
table.summary th { max-width: 130px; }
span.name { white-space: nowrap; }
tr.baseline td { background: #fafbfc; }
.badge { display: inline-block; padding: 1px 7px; border-radius: 9px; font-size: 12px; font-weight: 600; }
.pass { background: #dafbe1; color: var(--pass); }
.fail { background: #ffebe9; color: var(--fail); }
.na { background: var(--band); color: var(--muted); }
.bundle { background: #fff8c5; color: var(--warn); }
.swatch { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 6px; }
.plots { display: flex; flex-wrap: wrap; gap: 18px; }
figure { margin: 6px 0 14px; }
figcaption { font-size: 12px; color: var(--muted); max-width: 760px; }
svg.plot { max-width: 100%; height: auto; background: #fff; }
svg.plot text { fill: var(--fg); font-family: inherit; }
svg.plot text.muted { fill: var(--muted); }
svg.plot .grid { stroke: #eceff3; stroke-width: 1; }
svg.plot .axis { stroke: #8a93a3; stroke-width: 1; }
svg.plot .frame { fill: none; stroke: #8a93a3; stroke-width: 1; }
svg.plot .front { fill: none; stroke: #9aa3b2; stroke-width: 1.5; stroke-dasharray: 5 4; }
svg.plot .curve { fill: none; stroke-width: 2; }
svg.plot .legend-line { stroke-width: 3; }
svg.plot .marker { stroke: #9aa3b2; stroke-width: 1; stroke-dasharray: 4 3; }
svg.plot .point { stroke: #fff; stroke-width: 1.5; }
pre { background: var(--band); border: 1px solid var(--line); padding: 10px 12px; overflow-x: auto;
      font-size: 12.5px; white-space: pre-wrap; word-break: break-all; }
details { margin: 8px 0; }
summary { cursor: pointer; font-weight: 600; }
dl.kv { display: grid; grid-template-columns: max-content 1fr; gap: 3px 16px; margin: 6px 0; }
dl.kv dt { color: var(--muted); }
dl.kv dd { margin: 0; }
ul.notes li { margin: 3px 0; }
footer { margin-top: 40px; font-size: 12px; color: var(--muted); }
"""


# ---------------------------------------------------------------- small builders


def badge(passed: Any) -> tuple[str, str]:
    kind = {True: "pass", False: "fail"}.get(passed, "na")
    return ("raw", f'<span class="badge {kind}">{esc(fmt_pass(passed) if passed is not None else "n/a")}</span>')


REFERENCE_BADGE = ("raw", '<span class="badge na">reference</span>')


def kv(pairs: Iterable[tuple[str, Any]]) -> str:
    return '<dl class="kv">' + "".join(f"<dt>{esc(k)}</dt><dd>{esc(MISSING if v is None or v == '' else v)}</dd>"
                                       for k, v in pairs) + "</dl>"


def _ok(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def fmt_signed_ms(x: Any) -> str:
    return MISSING if not _ok(x) else ("-" if x < 0 else "+") + fmt_ms(abs(x))


def _swatch(i: int) -> str:
    return f'<span class="swatch" style="background:{colour(i)}"></span>'


# ---------------------------------------------------------------- sections


def _summary(profile: ProfileManifest) -> str:
    rows, classes = [], []
    all_rows = summary_rows(profile)
    for i, r in enumerate(all_rows):
        name = f'<span class="name">{_swatch(i)}<strong>{esc(r["variant"])}</strong></span>'
        if not r["measured"]:
            bundle = "bundle only" in (r["status"] or "")
            name += (f'<br><span class="badge {"bundle" if bundle else "na"}">'
                     f'{"bundle only" if bundle else "not measured"}</span>')
        size = fmt_bytes(r["size_bytes"])
        if r["size_artifact"] and r["size_bytes"] is not None:
            size += f'<br><span class="muted">{esc(r["size_artifact"])}</span>'
        rel = r["metric_delta_relative_percent"]
        delta = fmt_num(r["metric_delta_points"], 3, sign=True)
        if _ok(rel):
            delta += f'<br><span class="muted">{rel:+.1f}%</span>'
        latency = MISSING if r["median_ms"] is None else f"{fmt_ms(r['median_ms'])} / {fmt_ms(r['p90_ms'])}"
        rows.append([
            ("raw", name), f"{r['target']} · {r['precision']}", ("raw", size), latency,
            fmt_num(r["throughput_ips"], 1), fmt_speedup(r["speedup_vs_pytorch"]),
            fmt_speedup(r["speedup_vs_onnx_fp32"]), fmt_num(r["metric_percent"], 3), ("raw", delta),
            badge(r["passed"]) if r["role"] != "baseline" else REFERENCE_BADGE,
            ("small", (r["runtime"] or MISSING) if r["measured"] else r["status"]),
        ])
        classes.append("baseline" if r["role"] == "baseline" else "")
    batch = next((r["batch_size"] for r in all_rows if r["batch_size"]), 1)
    metric = profile.metric
    header = ["Variant", "Target · precision", "Size on disk", f"Median / p90 ms (batch {batch})", "Images/s",
              "Speed-up vs PyTorch FP32", "Speed-up vs ONNX FP32", f"{metric} %", f"Δ {metric} (points, relative)",
              "Pass", "Runtime that produced the numbers"]
    worse = "increase" if metric == "NME" else "decrease"
    note = ("<p class=\"muted\">Speed-up = median latency of the reference / median latency of the variant, "
            f"same batch size, same model. Δ {esc(metric)} is against the PyTorch FP32 reference on the same images; "
            f"pass = its {worse} ≤ the build's tolerance (see Accuracy).</p>")
    return section("summary", "Summary", table(header, rows, numeric=range(2, 9), row_classes=classes,
                                               cls="summary") + note)


def _points(profile: ProfileManifest) -> list[dict]:
    pts = []
    for i, r in enumerate(summary_rows(profile)):
        if _ok(r["median_ms"]) and _ok(r["metric_percent"]):
            pts.append({"x": r["median_ms"], "y": r["metric_percent"], "label": r["variant"], "colour": colour(i)})
    return pts


def _plot_min_span(profile: ProfileManifest) -> float:
    """The least metric span an accuracy axis may show: the largest gate tolerance of the
    variants (a difference the gate accepts many times over is not a cliff), or the task's
    default tolerance when no variant states one."""
    tolerances = [v.accuracy.tolerance_points for v in profile.variants
                  if v.accuracy and _ok(v.accuracy.tolerance_points)]
    if tolerances:
        return max(tolerances)
    return DEFAULT_TOLERANCE_POINTS.get(profile.metric, 0.0)


def _pareto(profile: ProfileManifest) -> str:
    pts = _points(profile)
    metric = profile.metric
    if not pts:
        return section("pareto", "Latency vs accuracy", "<p class=\"muted\">No variant has both a latency and an "
                       f"{esc(metric)} (accuracy needs an evaluation set: pass --data).</p>")
    higher = metric != "NME"
    svg = scatter_svg(pts, "median latency per batch (ms)", f"{metric} (%)", f"Latency vs {metric}",
                      y_higher_is_better=higher, y_min_span=_plot_min_span(profile))
    return section("pareto", "Latency vs accuracy", figure(
        svg, f"Each point is a variant ({'upper' if higher else 'lower'}-left is better). Larger points joined by "
             "the dashed line form the Pareto front: no other variant is both faster and more accurate."))


def _ced(profile: ProfileManifest) -> str:
    if any(v.accuracy and v.accuracy.pckh_curve for v in profile.variants):
        return _pckh_curve(profile)
    series, max_t, auc_t = [], None, None
    for i, v in enumerate(profile.variants):
        ced = v.accuracy.ced if v.accuracy else None
        if not ced:
            continue
        max_t, auc_t = ced.max_threshold, ced.auc_threshold
        series.append({"label": v.name, "colour": colour(i),
                       "xs": [t * 100 for t in ced.thresholds], "ys": [f * 100 for f in ced.fraction]})
    if not series:
        return section("ced", "Cumulative error distribution", "<p class=\"muted\">Accuracy was not measured.</p>")
    svg = lines_svg(series, "NME threshold (%)", "images with NME below threshold (%)", "CED curves",
                    x_max=max_t * 100, marker_x=auc_t * 100 if auc_t else None,
                    marker_label=f"{auc_t * 100:g}%" if auc_t else "")
    return section("ced", "Cumulative error distribution", figure(
        svg, f"Fraction of images whose NME is below each threshold; the dashed line marks "
             f"{auc_t * 100:g}% (AUC and failure-rate threshold)." if auc_t else "CED curves per variant."))


def _pckh_curve(profile: ProfileManifest) -> str:
    """The pose task's CED: PCKh at each threshold from 0 to 0.5 head sizes."""
    series, max_t = [], None
    for i, v in enumerate(profile.variants):
        curve = v.accuracy.pckh_curve if v.accuracy else None
        if not curve:
            continue
        max_t = curve.max_threshold
        series.append({"label": v.name, "colour": colour(i), "xs": list(curve.thresholds),
                       "ys": [f * 100 for f in curve.fraction]})
    svg = lines_svg(series, "threshold (head sizes)", "PCKh: visible joints within threshold (%)",
                    "PCKh vs threshold", x_max=max_t, marker_x=0.5 if max_t >= 0.5 else None, marker_label="0.5")
    return section("ced", "PCKh vs threshold", figure(
        svg, "Fraction of visible joints (pelvis and thorax excluded) whose error is within each threshold, in "
             "head sizes (0.6 x head-box diagonal); the value at 0.5 is PCKh@0.5."))


def _per_joint(profile: ProfileManifest) -> str:
    """Pose: PCKh@0.5 per joint and variant."""
    per_joint = {v.name: v.accuracy.metrics.per_joint_percent for v in profile.variants
                 if v.accuracy and v.accuracy.metrics.per_joint_percent}
    if not per_joint:
        return ""
    joints = list(next(iter(per_joint.values())))
    rows = [[name] + [fmt_num(values.get(j), 1) for j in joints] for name, values in per_joint.items()]
    return "<h3>PCKh@0.5 per joint (%)</h3>" + table(["Variant"] + joints, rows, numeric=range(1, len(joints) + 1))


def _accuracy(profile: ProfileManifest) -> str:
    data = profile.data
    if not data:
        notes = [n for n in profile.notes if "evaluation data" in n]
        return section("accuracy", "Accuracy", f"<p>{esc(notes[0] if notes else 'Accuracy was not measured.')}</p>")
    variants = profile.variants
    tolerances = sorted({(v.accuracy.tolerance_points, v.accuracy.tolerance_source)
                         for v in variants if v.accuracy and not v.baseline},
                        key=lambda t: (t[0] is None, t))
    reference = next((v for v in variants if v.baseline), None)
    metric = profile.metric
    pose = metric != "NME"
    settings = kv([
        ("Data set", f"{data.folder} (split {data.split or 'all images'})"),
        ("Images", data.images),
        ("Crop policy", data.crop_policy or data.crop),
        ("Normaliser", data.normalizer),
        ("Flip test", "on" if data.flip else "off"),
        ("Reference", f"{reference.name}: {reference.runtime}" if reference else MISSING),
        ("Tolerance", "; ".join(f"{fmt_num(t, 3)} {metric} points ({s})" for t, s in tolerances) or MISSING),
        ("Runtimes", "; ".join(dict.fromkeys(v.runtime for v in variants if v.accuracy))),
    ])
    rows = []
    for v in variants:
        a = v.accuracy
        if not a:
            continue
        m = a.metrics
        rel = a.delta_relative_percent
        extra = ([fmt_num(m.pckh_02, 2)] if pose else
                 [fmt_num(m.failure_rate_008, 2), fmt_num(m.failure_rate_010, 2), fmt_num(m.auc_008, 2)])
        rows.append([
            v.name, ("small", a.runtime), fmt_num(a.reference_value, 3),
            fmt_num(a.value, 3), fmt_num(a.delta_points, 3, sign=True),
            fmt_num(rel, 1, sign=True) + ("%" if _ok(rel) else ""), *extra, fmt_num(a.tolerance_points, 3),
            badge(a.passed) if not v.baseline else REFERENCE_BADGE,
        ])
    extra_header = ["PCKh@0.2 %"] if pose else ["FR@0.08 %", "FR@0.10 %", "AUC@0.08 %"]
    measured = table(["Variant", "Runtime", f"FP32 reference {metric} %", f"{metric} %", "Δ (points)", "Δ (relative)",
                      *extra_header, "Tolerance (points)", "Pass"],
                     rows, numeric=range(2, 7 + len(extra_header))) + _per_joint(profile)
    gates = []
    for v in variants:
        g = v.build_accuracy
        if not g:
            continue
        gates.append([
            v.name, ("small", g.runtime), fmt_num(g.reference.value(g.key) if g.reference else None, 3),
            fmt_num(g.quantized.value(g.key) if g.quantized else None, 3), fmt_num(g.worse_points, 3, sign=True),
            fmt_num(g.tolerance, 3), badge(g.passed),
        ])
    gate_html = ""
    if gates:
        gate_html = ("<h3>Accuracy gate recorded at build time (build.json)</h3>" + table(
            ["Build", "Runtime", f"FP32 reference {metric} %", f"Quantized {metric} %",
             f"{'Decrease' if pose else 'Increase'} (points)", "Tolerance", "Passed"],
            gates, numeric=range(2, 6)))
    return section("accuracy", "Accuracy", "<h3>Settings</h3>" + settings + "<h3>Measured in this profile</h3>"
                   + measured + gate_html)


def _batch_sweep(profile: ProfileManifest) -> str:
    sizes = sorted({e.batch_size for v in profile.variants for e in v.batch_sweep if e.batch_size})
    if not sizes:
        return ""
    rows = []
    for v in profile.variants:
        by = {e.batch_size: e for e in v.batch_sweep}
        if not by:
            continue
        row = [v.name]
        for b in sizes:
            e = by.get(b)
            row += ([fmt_ms(e.median_ms), fmt_ms(e.p99_ms), fmt_num(e.throughput_ips, 1)] if e else
                    [MISSING, MISSING, MISSING])
        rows.append(row)
    header = ["Variant"] + [f"b{b} {h}" for b in sizes for h in ("median ms", "p99 ms", "images/s")]
    s = profile.settings
    caption = (f"<p class=\"muted\">Timed runs per batch size: {esc(s.sweep_runs if s.sweep_runs is not None else '')}; "
               f"warm-up runs: {esc(s.warmup)} at batch 1, proportionally fewer at larger batches. "
               f"Timing: {esc(s.timing or '')}.</p>")
    latency_rows = []
    for v in profile.variants:
        lat = v.latency
        if lat:
            latency_rows.append([v.name, lat.batch_size, lat.runs, fmt_ms(lat.median_ms),
                                 fmt_ms(lat.p90_ms), fmt_ms(lat.p95_ms), fmt_ms(lat.p99_ms),
                                 fmt_ms(lat.mean_ms), fmt_ms(lat.min_ms), fmt_ms(lat.max_ms),
                                 fmt_num(lat.throughput_ips, 1)])
    detail = table(["Variant", "Batch", "Runs", "Median", "p90", "p95", "p99", "Mean", "Min", "Max", "Images/s"],
                   latency_rows, numeric=range(1, 11))
    return section("latency", "Latency and batch sweep", "<h3>Latency (ms)</h3>" + detail
                   + "<h3>Batch sweep</h3>" + table(header, rows, numeric=range(1, len(header))) + caption)


def _served(profile: ProfileManifest) -> str:
    """profile --serve: each CPU build in-process and served by Triton, concurrency 1 and 8."""
    served = [v for v in profile.variants if v.served and v.served.rows]
    if not served:
        return ""
    rows = []
    for v in served:
        for r in v.served.rows:
            batches = ", ".join(f"{b}: {n}" for b, n in sorted(r.executions_by_batch_size.items(),
                                                                key=lambda kv: int(kv[0])))
            rows.append([v.name, r.runner, r.concurrency, fmt_ms(r.p50_ms), fmt_ms(r.p99_ms),
                         fmt_num(r.throughput_infer_per_s, 1), fmt_ms(r.server_queue_ms), fmt_ms(r.server_compute_ms),
                         ("small", batches or MISSING)])
    first = served[0].served
    caption = (f"<p class=\"muted\">One image per request; each row measured for {esc(fmt_num(first.seconds, 1))} s. "
               f"In-process: the engine in this process, called from N threads. Served: Triton "
               f"{esc(first.triton)} (Python backend running the same engine, as `cunet-optimize serve`), "
               "measured by perf_analyzer; server executions by batch size show the dynamic batcher "
               "(docs/SERVING.md).</p>")
    return section("served", "Served vs in-process", table(
        ["Variant", "Runner", "Concurrency", "p50 ms", "p99 ms", "Images/s", "Server queue ms", "Server compute ms",
         "Executions by batch size"], rows, numeric=range(2, 8)) + caption)


def _memory_size(profile: ProfileManifest) -> str:
    rows = []
    for v in profile.variants:
        size, mem = v.size or Size(), v.memory or Memory()
        weights = size.weights or Weights()
        dtypes = ", ".join(f"{k} {fmt_bytes(e.bytes)}" for k, e in weights.by_dtype.items())
        rows.append([
            v.name, size.deploy_artifact or MISSING, fmt_bytes(size.deploy_bytes),
            fmt_bytes(size.total_bytes), fmt_bytes(weights.total_bytes), ("small", dtypes or MISSING),
            fmt_bytes(mem.inference_growth_bytes), fmt_bytes(mem.peak_rss_bytes),
        ])
    method = profile.settings.memory_method
    caption = f"<p class=\"muted\">Memory: {esc(method)}.</p>" if method else \
        "<p class=\"muted\">Memory was not measured (--memory off).</p>"
    return section("memory", "Size and memory", table(
        ["Variant", "Deployed artifact", "Its size", "All artifacts", "Weights", "Weights by data type",
         "Inference memory (RSS growth)", "Peak RSS of the process"], rows, numeric=(2, 3, 4, 6, 7)) + caption)


def _layers(profile: ProfileManifest) -> str:
    parts = []
    for i, v in enumerate(profile.variants):
        lay = v.layers
        if not lay:
            continue
        ops = lay.by_op_type[:TOP_LAYERS]
        svg = hbars_svg([(o.op_type, o.ms_per_run, f"{fmt_ms(o.ms_per_run)} ms · {o.percent:.1f}%")
                         for o in ops], "kernel time per run (ms)", f"{v.name}: time by op type", colour(i))
        nodes = table(["Node", "Op type", "ms per run", "% of kernel time"],
                      [[("small", n.node), n.op_type, fmt_ms(n.ms_per_run), fmt_num(n.percent, 1)]
                       for n in lay.top_nodes[:TOP_LAYERS]], numeric=(2, 3))
        head = (f"{esc(v.name)}: {fmt_ms(lay.total_ms_per_run)} ms kernel time per run, "
                f"{esc(lay.nodes)} nodes, batch {esc(lay.batch_size)}, {esc(lay.runs)} runs")
        if lay.run_ms_per_run is not None:
            head += (f"; the run takes {fmt_ms(lay.run_ms_per_run)} ms "
                     f"({fmt_ms(lay.outside_kernels_ms_per_run)} ms outside the kernels)")
        by_type = table(["Op type", "Nodes", "ms per run", "% of kernel time"],
                        [[o.op_type, "" if o.nodes is None else o.nodes, fmt_ms(o.ms_per_run), fmt_num(o.percent, 1)]
                         for o in ops], numeric=(1, 2, 3))
        scaling = lay.thread_scaling
        scale = ""
        if scaling:
            scale = ("<p>Latency by intra-op threads (batch 1, median): " + ", ".join(
                f"{esc(n)}: {fmt_ms(ms)} ms (x{fmt_num(scaling.speedup_vs_1_thread.get(n), 2)})"
                for n, ms in scaling.median_ms_batch1.items())
                + f"; the build uses {esc(scaling.build_threads)}.</p>")
        opened = " open" if not parts else ""
        parts.append(f"<details{opened}><summary>{head}</summary>{scale}"
                     f'<div class="plots"><figure>{svg}<figcaption>Top {TOP_LAYERS} op types.</figcaption></figure>'
                     f"<div><h3>By op type</h3>{by_type}<h3>Top {TOP_LAYERS} nodes</h3>{nodes}</div></div></details>")
    if not parts:
        return ""
    src = next(v.layers.source for v in profile.variants if v.layers)
    return section("layers", "Per-layer time", f'<p class="muted">{esc(src)}.</p>' + "".join(parts))


def _surgery(profile: ProfileManifest) -> str:
    parts = []
    for v in profile.variants:
        s = v.surgery
        if not s:
            continue
        rows = []
        for p in s.pass_records:
            rows.append([p.name, MISSING if p.rewrites is None else p.rewrites,
                         f"{_or_missing(p.nodes_before)} → {_or_missing(p.nodes_after)}",
                         f"{_or_missing(p.concats_before)} → {_or_missing(p.concats_after)}",
                         f"{fmt_bytes(p.concat_bytes_before)} → {fmt_bytes(p.concat_bytes_after)}"])
        totals = kv([
            ("Peak activation memory (batch 1)", f"{fmt_bytes(s.peak_activation_bytes_before)} → "
                                                 f"{fmt_bytes(s.peak_activation_bytes_after)}"),
            ("Concat outputs (batch 1)", f"{fmt_bytes(s.concat_bytes_before)} → "
                                         f"{fmt_bytes(s.concat_bytes_after)}"),
        ])
        tbl = table(["Pass", "Rewrites", "Nodes", "Concats", "Concat bytes"], rows, numeric=(1, 2, 3, 4)) \
            if rows else ""
        parts.append(f"<h3>{esc(v.name)}</h3>{totals}{tbl}")
    return section("surgery", "Graph surgery", "".join(parts)) if parts else ""


def _or_missing(x: Any) -> Any:
    return MISSING if x is None else x


def _calibration(profile: ProfileManifest) -> str:
    parts = []
    for v in profile.variants:
        c = v.calibration
        if not c:
            continue
        ranges = list((c.ranges or {}).items())
        info = kv([("Method", c.method), ("Scheme", c.scheme), ("Images", c.images),
                   ("Data", c.data), ("Scales file", c.scales_file)])
        tbl = table(["Tensor", "amax"], [[("small", k), fmt_num(a, 4)] for k, a in ranges[:CALIBRATION_ROWS]],
                    numeric=(1,)) if ranges else ""
        more = f'<p class="muted">{len(ranges) - CALIBRATION_ROWS} more in the scales file.</p>' \
            if len(ranges) > CALIBRATION_ROWS else ""
        parts.append(f"<h3>{esc(v.name)}</h3>{info}{tbl}{more}")
    return section("calibration", "Calibration", "".join(parts)) if parts else ""


def _loads(values: list[float] | None) -> str:
    return ", ".join(f"{x:g}" for x in values) if values else MISSING


def _environment(profile: ProfileManifest) -> str:
    env = profile.environment
    pairs = [
        ("CPU", env.cpu), ("Cores (usable)", f"{env.cpu_cores} ({env.cpu_cores_usable})"),
        ("Memory", fmt_bytes(env.memory_total_bytes)), ("GPU", env.gpu),
        ("OS", env.os), ("Python", env.python),
        *((name, ver) for name, ver in env.versions.items() if ver),
        ("Load average 1/5/15 min (start; end)", f"{_loads(env.load_average)}; {_loads(env.load_average_end)}"),
        ("Created", profile.created), ("Profile took", f"{fmt_num(profile.seconds, 1)} s"),
    ]
    return section("environment", "Environment", kv(pairs))


def _commands(profile: ProfileManifest, json_name: str | None) -> str:
    cmds = profile.commands
    lines = ["# builds"]
    for b in cmds.builds:
        lines.append(b.command or f"# {b.name}: build command not recorded")
    lines += ["", "# profile", cmds.profile or "cunet-optimize profile"]
    if json_name:
        lines += ["", "# this page, from the JSON", f"cunet-optimize report {json_name}"]
    return section("reproduce", "Commands to reproduce", f"<pre>{esc(chr(10).join(lines))}</pre>")


def _notes(profile: ProfileManifest) -> str:
    notes = list(profile.notes)
    for v in profile.variants:
        notes += [f"{v.name}: {n}" for n in v.notes]
    if not notes:
        return ""
    return section("notes", "Notes", '<ul class="notes">' + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>")


def _compare(profile: ProfileManifest, other: ProfileManifest) -> str:
    mine = {r["variant"]: r for r in summary_rows(profile)}
    theirs = {r["variant"]: r for r in summary_rows(other)}
    rows = []
    for name in list(mine) + [n for n in theirs if n not in mine]:
        a, b = mine.get(name, {}), theirs.get(name, {})
        la, lb = a.get("median_ms"), b.get("median_ms")
        na, nb = a.get("metric_percent"), b.get("metric_percent")
        d_ms = la - lb if _ok(la) and _ok(lb) else None
        d_rel = 100 * d_ms / lb if d_ms is not None and lb else None
        d_nme = na - nb if _ok(na) and _ok(nb) else None
        where = "both" if a and b else ("this profile only" if a else "other profile only")
        rows.append([name, where, fmt_ms(lb), fmt_ms(la), fmt_signed_ms(d_ms),
                     fmt_num(d_rel, 1, sign=True) + ("%" if _ok(d_rel) else ""),
                     fmt_num(nb, 3), fmt_num(na, 3), fmt_num(d_nme, 3, sign=True)])
    env_a, env_b = profile.environment, other.environment
    intro = kv([
        ("This profile", f"{profile.name} ({profile.created}, {env_a.cpu})"),
        ("Compared with", f"{other.name} ({other.created}, {env_b.cpu})"),
    ])
    caution = ""
    if env_a.cpu != env_b.cpu or env_a.cpu_cores_usable != env_b.cpu_cores_usable:
        caution = '<p class="muted">The two profiles ran on different machines: latency deltas mix the change ' \
                  "with the hardware.</p>"
    metric = profile.metric
    return section("compare", "Comparison with another profile", intro + caution + table(
        ["Variant", "In", "Other median ms", "This median ms", "Δ ms", "Δ latency", f"Other {metric} %",
         f"This {metric} %", f"Δ {metric} (points)"], rows, numeric=range(2, 9)) +
        '<p class="muted">Δ = this profile minus the other; negative latency Δ = faster now.</p>')


from cunet_optimize.report.auto_plan import auto_plan_section  # noqa: E402


def render_html(profile: ProfileManifest | dict, compare: ProfileManifest | dict | None = None,
                json_name: str | None = None) -> str:
    """The report page for a profile (and optionally a comparison with another)."""
    p = as_profile(profile)
    compare = as_profile(compare, "compare profile") if compare is not None else None
    title = f"CU-Net profile: {p.name}"
    metric = p.metric
    sections = [
        _summary(p),
        _compare(p, compare) if compare is not None else "",
        _pareto(p), _ced(p), _accuracy(p), _batch_sweep(p), _served(p), _memory_size(p), _layers(p),
        _surgery(p), auto_plan_section(p), _calibration(p), _environment(p), _commands(p, json_name), _notes(p),
    ]
    present = [(anchor, label) for anchor, label in (
        ("summary", "Summary"), ("compare", "Comparison"), ("pareto", f"Latency vs {metric}"),
        ("ced", "CED" if metric == "NME" else "PCKh curve"),
        ("accuracy", "Accuracy"), ("latency", "Latency"), ("served", "Served"), ("memory", "Size & memory"), ("layers", "Per-layer"),
        ("surgery", "Surgery"), ("auto-plan", "Mixed precision"), ("calibration", "Calibration"), ("environment", "Environment"),
        ("reproduce", "Reproduce"), ("notes", "Notes"),
    ) if any(f'id="{anchor}"' in s for s in sections)]
    nav = "<nav>" + "".join(f'<a href="#{a}">{esc(label)}</a>' for a, label in present) + "</nav>"
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>"
        f"<h1>{esc(title)}</h1>"
        f'<p class="muted">{esc(p.created)} · {len(p.variants)} variants · '
        f"cunet-optimize {esc(p.toolkit_version)}</p>{nav}"
        f'<p class="statement">{esc(p.statement)}</p>'
        + "".join(sections)
        + f"<footer>Generated by cunet-optimize {esc(p.toolkit_version)} from {esc(json_name or 'a profile')}"
        "; self-contained: no scripts, no external resources.</footer></main></body></html>\n"
    )
