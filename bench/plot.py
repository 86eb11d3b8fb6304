"""A hand-written SVG of the scheduling figures: makespan and duration ratio per strategy (no plotting "
"library)."""

from __future__ import annotations

import math
from html import escape
from typing import Any

COLOURS = {"sequential": "#8c8c8c", "semaphore": "#d9822b", "runner": "#2b7bb9"}
P50, P99 = "#9ecae1", "#08519c"


def _axis_max(values: list[float]) -> float:
    top = max(values) if values else 1.0
    magnitude = 10 ** math.floor(math.log10(top)) if top > 0 else 1
    for step in (1, 2, 2.5, 5, 10):
        if top <= step * magnitude:
            return step * magnitude
    return 10 * magnitude


def scheduling_svg(raw: dict[str, Any], machine: dict[str, Any]) -> str:
    per = raw["per_strategy"]
    params = raw["params"]
    ideal, bound = params["ideal_s"], raw["lower_bound_s"]
    strategies = [s for s in ("sequential", "semaphore", "runner") if s in per]
    width, height = 960, 460
    top, bottom = 70, 360
    plot_h = bottom - top
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} '
        f'{height}" '
        'font-family="Helvetica, Arial, sans-serif" font-size="13">',
        '<rect width="100%" height="100%" fill="white"/>',
        '<text x="20" y="26" font-size="16" font-weight="bold">Scheduling strategies: '
        f"N={params['customers']} customers, "
        f"C={params['cap']}, marketplace latency {params['latency_s'] * 1000:.0f} ms ± "
        f"{params['jitter_s'] * 500:.0f} ms</text>",
        f'<text x="20" y="46" fill="#555">{escape(str(machine["nproc"]))} × {escape(machine["cpu"])}, Python '
        f"{escape(machine['python'])}; medians of repetitions</text>",
    ]

    # left: makespan (linear), with the ideal and the measured lower bound
    x0, panel_w = 80, 360
    values = [per[s]["makespan_s"] or 0.0 for s in strategies]
    y_max = _axis_max([*values, ideal, bound])
    parts.append(f'<text x="{x0}" y="{top - 10}" font-weight="bold">makespan (s)</text>')
    parts += _y_axis(x0, top, bottom, panel_w, y_max, linear=True)
    bar_w = panel_w / len(strategies) * 0.6
    for i, (s, v) in enumerate(zip(strategies, values, strict=True)):
        cx = x0 + panel_w / len(strategies) * (i + 0.5)
        h = plot_h * v / y_max
        parts.append(
            f'<rect x="{cx - bar_w / 2:.1f}" y="{bottom - h:.1f}" width="{bar_w:.1f}" height="{h:.1f}" '
            f'fill="{COLOURS[s]}"/>'
        )
        parts.append(f'<text x="{cx:.1f}" y="{bottom - h - 5:.1f}" text-anchor="middle">{v:.2f} s</text>')
        parts.append(f'<text x="{cx:.1f}" y="{bottom + 18}" text-anchor="middle">{s}</text>')
    legend_y = bottom + 45
    for k, (value, label, dash) in enumerate(
        ((ideal, "ideal ceil(N/C)×L", "6,4"), (bound, "measured lower bound", "2,3"))
    ):
        y = bottom - plot_h * value / y_max
        parts.append(
            f'<line x1="{x0}" y1="{y:.1f}" x2="{x0 + panel_w}" y2="{y:.1f}" stroke="#c0392b" '
            f'stroke-dasharray="{dash}"/>'
        )
        ly = legend_y + 18 * k
        parts.append(
            f'<line x1="{x0}" y1="{ly - 4}" x2="{x0 + 30}" y2="{ly - 4}" stroke="#c0392b" '
            f'stroke-dasharray="{dash}"/><text x="{x0 + 38}" y="{ly}">{label} = {value:.2f} s</text>'
        )

    # right: duration ratio p50 / p99 (log scale), target 1.05
    x1 = 560
    ratios = [v for s in strategies for v in (per[s]["ratio_p50"], per[s]["ratio_p99"]) if v]
    r_max = 10 ** math.ceil(math.log10(max([*ratios, 2.0]) * 1.5))
    parts.append(
        f'<text x="{x1}" y="{top - 10}" font-weight="bold">transaction duration ÷ own work (log)</text>'
    )
    parts += _y_axis(x1, top, bottom, panel_w, r_max, linear=False)
    group_w = panel_w / len(strategies)
    for i, s in enumerate(strategies):
        for j, (key, colour) in enumerate((("ratio_p50", P50), ("ratio_p99", P99))):
            v = per[s][key]
            if not v:
                continue
            h = plot_h * math.log10(max(v, 1.0)) / math.log10(r_max)
            x = x1 + group_w * i + group_w * (0.2 + 0.3 * j)
            parts.append(
                f'<rect x="{x:.1f}" y="{bottom - h:.1f}" width="{group_w * 0.28:.1f}" '
                f'height="{max(h, 1):.1f}" fill="{colour}"/>'
            )
            parts.append(
                f'<text x="{x + group_w * 0.14:.1f}" y="{bottom - max(h, 14) - 5:.1f}" text-anchor="middle" '
                f'font-size="11">{v:.2f}</text>'
            )
        parts.append(
            f'<text x="{x1 + group_w * (i + 0.5):.1f}" y="{bottom + 18}" text-anchor="middle">{s}</text>'
        )
    y = bottom - plot_h * math.log10(1.05) / math.log10(r_max)
    parts.append(
        f'<line x1="{x1}" y1="{y:.1f}" x2="{x1 + panel_w}" y2="{y:.1f}" stroke="#c0392b" '
        'stroke-dasharray="6,4"/>'
    )
    parts.append(
        f'<line x1="{x1 + 140}" y1="{legend_y - 4}" x2="{x1 + 170}" y2="{legend_y - 4}" stroke="#c0392b" '
        f'stroke-dasharray="6,4"/><text x="{x1 + 178}" y="{legend_y}">runner target: p99 ≤ 1.05</text>'
    )
    parts.append(
        f'<rect x="{x1}" y="{legend_y - 10}" width="12" height="12" fill="{P50}"/><text x="{x1 + 18}" '
        f'y="{legend_y}">p50</text>'
    )
    parts.append(
        f'<rect x="{x1 + 70}" y="{legend_y - 10}" width="12" height="12" fill="{P99}"/><text x="{x1 + 88}" '
        f'y="{legend_y}">p99</text>'
    )
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _y_axis(x: float, top: float, bottom: float, width: float, y_max: float, linear: bool) -> list[str]:
    out = [
        f'<line x1="{x}" y1="{top}" x2="{x}" y2="{bottom}" stroke="#333"/>',
        f'<line x1="{x}" y1="{bottom}" x2="{x + width}" y2="{bottom}" stroke="#333"/>',
    ]
    if linear:
        ticks = [y_max * k / 5 for k in range(6)]
        pos = [bottom - (bottom - top) * t / y_max for t in ticks]
        labels = [f"{t:g}" for t in ticks]
    else:
        decades = round(math.log10(y_max))
        ticks = [10**k for k in range(decades + 1)]
        pos = [bottom - (bottom - top) * k / decades for k in range(decades + 1)]
        labels = [f"{t:g}×" for t in ticks]
    for p, label in zip(pos, labels, strict=True):
        out.append(f'<line x1="{x - 4}" y1="{p:.1f}" x2="{x + width}" y2="{p:.1f}" stroke="#e5e5e5"/>')
        out.append(f'<text x="{x - 8}" y="{p + 4:.1f}" text-anchor="end" font-size="11">{label}</text>')
    return out
