"""Report section of a `build --precision auto` variant: the per-conv precision map along the
network, and the weight-bytes vs degradation points the search visited and the builds measured.

The degradation axis starts at 0 and reaches at least the budget, so a 0.00005-point difference
between two plans is drawn as the sliver it is, not as a cliff."""

from __future__ import annotations

from html import escape

from cunet_optimize.manifests.build import AutoPlan, PlanLayer
from cunet_optimize.manifests.profile import ProfileManifest
from cunet_optimize.report.markup import esc, figure, section, table

FORMAT_COLOURS = {"int4": "#d95f02", "int8": "#1b9e77", "float": "#7570b3"}
POINT_STYLE = {"predicted": ("#1f77b4", 4), "held-out": ("#2ca02c", 5), "engine": ("#d62728", 6)}  # colour, radius


def precision_map_svg(layers: list[PlanLayer], width: int = 760) -> str:
    """One cell per conv in execution order, coloured by its format."""
    n = max(len(layers), 1)
    cell = (width - 20) / n
    body = []
    for i, layer in enumerate(layers):
        colour = FORMAT_COLOURS.get(layer.format, "#999")
        body.append(f'<rect x="{10 + i * cell:.1f}" y="10" width="{max(cell - 1, 1):.1f}" height="40" '
                    f'fill="{colour}"><title>{escape(layer.name)}: {escape(layer.format)} '
                    f'({layer.weight_bytes:.0f} B)</title></rect>')
    legend = "".join(f'<rect x="{10 + k * 90}" y="60" width="12" height="12" fill="{c}"/>'
                     f'<text x="{26 + k * 90}" y="71" font-size="12">{f}</text>'
                     for k, (f, c) in enumerate(FORMAT_COLOURS.items()))
    return (f'<svg class="plot" viewBox="0 0 {width} 80" width="{width}" height="80" role="img" '
            f'aria-label="per-conv precision map">' + "".join(body) + legend + "</svg>")


def search_points_svg(auto: AutoPlan, width: int = 760, height: int = 360) -> str:
    """Weight bytes (x) vs degradation (y, from 0 to >= the budget): predicted, measured on the
    held-out images (joint runs), and measured on the engines."""
    # a visited plan's (or joint run's) cost is in weight bytes only when the search minimised size
    size = auto.objective == "size"
    pts = [(v.cost, v.predicted, "predicted") for v in auto.visited if size and v.cost is not None]
    pts += [(r.cost, r.measured, "held-out") for r in auto.joint_runs if size]
    pts += [(b.weight_bytes, b.degradation, "engine") for b in auto.builds]
    budget = auto.budget or 0.0
    if not pts:
        return ""
    left, right, top, bottom = 72, width - 24, 20, height - 52
    xs = [p[0] for p in pts]
    x_lo, x_hi = min(xs) * 0.95, max(xs) * 1.05 or 1.0
    y_hi = max([budget] + [p[1] for p in pts]) * 1.15 or 1.0
    y_lo = min(0.0, min(p[1] for p in pts) * 1.15)

    def X(v):
        return left + (v - x_lo) / ((x_hi - x_lo) or 1.0) * (right - left)

    def Y(v):
        return bottom - (v - y_lo) / ((y_hi - y_lo) or 1.0) * (bottom - top)

    body = [f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#444"/>',
            f'<line x1="{left}" y1="{top}" x2="{left}" y2="{bottom}" stroke="#444"/>',
            f'<line x1="{left}" y1="{Y(budget):.1f}" x2="{right}" y2="{Y(budget):.1f}" '
            f'stroke="#c00" stroke-dasharray="4 3"><title>budget {auto.budget}</title></line>',
            f'<text x="{(left + right) / 2}" y="{height - 12}" font-size="12" text-anchor="middle">weight bytes</text>',
            f'<text x="14" y="{(top + bottom) / 2}" font-size="12" transform="rotate(-90 14 {(top + bottom) / 2})" '
            f'text-anchor="middle">degradation (points)</text>']
    for frac in (0.0, 0.5, 1.0):
        yv = y_lo + frac * (y_hi - y_lo)
        body.append(f'<text x="{left - 6}" y="{Y(yv) + 4:.1f}" font-size="11" text-anchor="end">{yv:.3g}</text>')
        xv = x_lo + frac * (x_hi - x_lo)
        body.append(f'<text x="{X(xv):.1f}" y="{bottom + 16}" font-size="11" text-anchor="middle">{xv:.3g}</text>')
    for x, y, kind in pts:
        colour, radius = POINT_STYLE[kind]
        body.append(f'<circle cx="{X(x):.1f}" cy="{Y(y):.1f}" r="{radius}" '
                    f'fill="{colour}"><title>{kind}: {x:.0f} B, {y:+.4f}</title></circle>')
    return (f'<svg class="plot" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
            f'aria-label="search points">' + "".join(body) + "</svg>")


def _heldout_text(auto: AutoPlan) -> str:
    held = auto.extra.get("heldout") or {}
    if "images" not in held:
        return ""
    return f" on {held['images']} images (sensitivity on {held.get('sensitivity_images', held['images'])})"


def auto_plan_section(profile: ProfileManifest) -> str:
    parts = []
    for v in profile.variants:
        a = v.auto
        if not a:
            continue
        counts: dict[str, int] = {}
        for f in a.plan.values():
            counts[f] = counts.get(f, 0) + 1
        parts.append(f"<h3>{esc(v.name)}</h3><p>{esc(a.objective)} objective, {esc(a.grain)} "
                     f"grain, budget {esc(a.budget)}: {esc(counts)}; weight bytes {a.weight_bytes or 0:.0f} "
                     f"(all INT8 {a.weight_bytes_uniform.get('int8', 0):.0f}); predicted "
                     f"{a.predicted_degradation or 0:+.4f}; {len(a.joint_runs)} joint held-out run(s)"
                     f"{_heldout_text(a)}; {len(a.back_off)} back-off step(s).</p>")
        parts.append(figure(precision_map_svg(a.layers), "Per-conv format along the network "
                            "(execution order; hover for the conv)"))
        svg = search_points_svg(a)
        if svg:
            parts.append(figure(svg, "Weight bytes vs degradation: blue = plans the search visited (additive "
                                     "prediction), green = plans run whole on the held-out images, red = engines "
                                     "built (measured on the evaluation set); dashed = budget"))
        rows = [(b.step, esc(b.formats), f"{b.predicted:+.4f}", f"{b.degradation:+.4f}",
                 "pass" if b.passed else "fail", f"{b.weight_bytes:.0f}") for b in a.builds]
        parts.append(table(["build", "formats", "predicted", "measured", "gate", "weight bytes"], rows))
    if not parts:
        return ""
    return section("auto-plan", "Mixed precision (build --precision auto)", "".join(parts))
