"""The report of a chaos run: report.json, a human summary, and a self-contained HTML timeline.

The timeline is one HTML file with inline SVG and no external asset (no script, no font, no stylesheet
link): REGISTER availability per second (share of attempts that succeeded) and median / max REGISTER latency
on a shared time axis, fault windows drawn as shaded bands from injection to heal with the round number
and fault name, leader changes as ticks, and the checkers' verdicts above.
"""

from __future__ import annotations

import html
import json
import statistics
from pathlib import Path
from typing import Any

from chaos.checkers import CheckResult, availability_series

Json = dict[str, Any]


def fault_table(history: list[Json], results: list[CheckResult]) -> list[Json]:
    """Per fault kind: rounds, time until the cluster caught up after the heal, REGISTER time to recover."""
    recovered: dict[str, list[float]] = {}
    for e in history:
        if e.get("kind") == "fault" and e.get("phase") == "recovered":
            recovered.setdefault(str(e["name"]), []).append(float(e.get("seconds") or 0.0))
    availability = next((r for r in results if r.name == "availability"), None)
    register: dict[str, list[float]] = {}
    for r in (availability.figures.get("recoveries", []) if availability else []):
        register.setdefault(str(r["fault"]), []).append(float(r["recovery_s"]))
    rows = []
    for name in sorted(recovered):
        caught, reg = sorted(recovered[name]), sorted(register.get(name, []))
        rows.append({"fault": name, "rounds": len(caught),
                     "caught_up_median_s": round(statistics.median(caught), 2), "caught_up_max_s": round(caught[-1], 2),
                     "register_recovery_median_s": round(statistics.median(reg), 2) if reg else None,
                     "register_recovery_max_s": round(reg[-1], 2) if reg else None})
    return rows


def summary_text(meta: Json, results: list[CheckResult], table: list[Json] | None = None) -> str:
    ok = all(r.ok for r in results)
    lines = [
        f"raftpbx chaos: scenario {meta['scenario']}, {meta['rounds']} rounds, seed {meta['seed']}, "
        f"lab {meta['lab']}, {meta['nodes']} nodes, {meta.get('duration_s', 0):.0f} s",
        f"faults: {', '.join(f'{k} x{v}' for k, v in sorted(meta.get('fault_counts', {}).items()))}",
        "",
    ]
    for r in results:
        lines.append(f"  [{'PASS' if r.ok else 'FAIL'}] {r.name:16s} {r.summary}")
        for v in r.violations[:5]:
            lines.append(f"           {json.dumps(v, default=str)[:300]}")
        if len(r.violations) > 5:
            lines.append(f"           ... {len(r.violations) - 5} more in report.json")
    if table:
        lines.append("")
        lines.append(f"  {'fault':18s} {'rounds':>6s} {'caught up after heal (median/max s)':>36s} "
                     f"{'REGISTER recovery (median/max s)':>34s}")
        for row in table:
            reg = ("-" if row["register_recovery_median_s"] is None
                   else f"{row['register_recovery_median_s']:.1f} / {row['register_recovery_max_s']:.1f}")
            lines.append(f"  {row['fault']:18s} {row['rounds']:6d} "
                         f"{row['caught_up_median_s']:>25.2f} / {row['caught_up_max_s']:<8.2f} {reg:>34s}")
    lines.append("")
    lines.append("RESULT: " + ("all checkers passed" if ok else "FAILED"))
    if not ok:
        lines.append(f"replay: {meta['replay']}")
        lines.append(f"kept: {meta['workdir']} (history.jsonl, logs/, node data dirs)")
    return "\n".join(lines)


def write_json(path: Path, meta: Json, results: list[CheckResult], history: list[Json]) -> None:
    doc = {
        "meta": meta,
        "ok": all(r.ok for r in results),
        "checkers": [r.to_json() for r in results],
        "availability": availability_series(history),
        "faults": [e for e in history if e.get("kind") == "fault"],
        "fault_table": fault_table(history, results),
        "rounds": [e for e in history if e.get("kind") == "round"],
    }
    path.write_text(json.dumps(doc, indent=1, default=str))


def timeline_html(meta: Json, results: list[CheckResult], history: list[Json]) -> str:
    series = availability_series(history)
    faults = [e for e in history if e.get("kind") == "fault"]
    samples = [e for e in history if e.get("kind") == "sample"]
    times = [float(e["t"]) for e in history if "t" in e]
    t_start = min(times) if times else 0.0
    t_end = max(times) if times else 1.0
    span = max(1.0, t_end - t_start)
    width, left, right = 1200, 60, 20
    plot_w = width - left - right

    def x(t: float) -> float:
        return left + (t - t_start) / span * plot_w

    parts: list[str] = []
    # Panel 1: availability (0..1), panel 2: latency (log-ish scale capped), panel 3: leader.
    p1_top, p1_h = 30, 160
    p2_top, p2_h = 230, 160
    p3_top = 420
    height = 470
    # Fault bands.
    injects: dict[int, Json] = {}
    for e in faults:
        if e.get("phase") == "inject":
            injects[int(e["round"])] = e
    for e in faults:
        if e.get("phase") != "heal":
            continue
        inj = injects.get(int(e["round"]))
        if inj is None:
            continue
        x0, x1 = x(float(inj.get("started") or inj["t"])), x(float(e["t"]))
        parts.append(f'<rect x="{x0:.1f}" y="{p1_top}" width="{max(1.5, x1 - x0):.1f}" height="{p3_top + 30 - p1_top}" '
                     f'fill="#f4a261" fill-opacity="0.25"><title>round {inj["round"]}: {html.escape(str(inj["name"]))}'
                     f' on {html.escape(", ".join(inj.get("targets") or []))}</title></rect>')
        parts.append(f'<text x="{x0 + 2:.1f}" y="{p1_top - 4}" font-size="9" fill="#9c4a00">'
                     f'{inj["round"]}:{html.escape(str(inj["name"]))}</text>')
    for e in faults:
        if e.get("phase") == "recovered":
            parts.append(f'<line x1="{x(float(e["t"])):.1f}" x2="{x(float(e["t"])):.1f}" y1="{p1_top}" '
                         f'y2="{p3_top + 30}" stroke="#2a9d8f" stroke-dasharray="3,3"/>')
    # Axes.
    for top, h, label in ((p1_top, p1_h, "REGISTER availability"), (p2_top, p2_h, "REGISTER latency (ms)")):
        parts.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{h}" fill="none" stroke="#999"/>')
        parts.append(f'<text x="{left + 4}" y="{top + 12}" font-size="11" fill="#333">{label}</text>')
    parts.append(f'<text x="{left - 4}" y="{p1_top + 4}" font-size="9" text-anchor="end">100%</text>')
    parts.append(f'<text x="{left - 4}" y="{p1_top + p1_h}" font-size="9" text-anchor="end">0%</text>')
    # Availability bars.
    bar_w = max(1.0, plot_w / span)
    for s in series:
        if s["ratio"] is None:
            continue
        h = s["ratio"] * p1_h
        color = "#2a9d8f" if s["ratio"] >= 0.9 else "#e63946"
        parts.append(f'<rect x="{x(s["t"]):.1f}" y="{p1_top + p1_h - h:.1f}" width="{bar_w:.1f}" height="{h:.1f}" '
                     f'fill="{color}"><title>{s["ok"]}/{s["attempts"]} ok</title></rect>')
    # Latency lines (capped at 2000 ms, square-root scale).
    cap = 2000.0

    def y_lat(ms: float) -> float:
        return float(p2_top + p2_h - (min(ms, cap) / cap) ** 0.5 * p2_h)

    for key, color in (("p50_ms", "#264653"), ("max_ms", "#e76f51")):
        pts = [f"{x(s['t'] + 0.5):.1f},{y_lat(float(s[key])):.1f}" for s in series if s.get(key) is not None]
        if pts:
            parts.append(f'<polyline points="{" ".join(pts)}" fill="none" stroke="{color}" stroke-width="1.2"/>')
    for ms in (10, 100, 500, 2000):
        parts.append(f'<text x="{left - 4}" y="{y_lat(ms) + 3:.1f}" font-size="9" text-anchor="end">{ms}</text>')
    parts.append(f'<text x="{left + plot_w - 4}" y="{p2_top + 12}" font-size="10" text-anchor="end">'
                 f'<tspan fill="#264653">median</tspan> / <tspan fill="#e76f51">max</tspan></text>')
    # Leader strip.
    parts.append(f'<text x="{left + 4}" y="{p3_top - 4}" font-size="11">leader (sampled) and service address holders</text>')
    palette = ["#457b9d", "#e9c46a", "#8ab17d", "#b5838d", "#6d597a", "#2a9d8f"]
    ids = sorted({str(e.get("leader")) for e in samples if e.get("leader")})
    for i, e in enumerate(samples):
        t0 = float(e["t"])
        t1 = float(samples[i + 1]["t"]) if i + 1 < len(samples) else t0 + 0.25
        leader = e.get("leader")
        color = palette[ids.index(str(leader)) % len(palette)] if leader else "#e63946"
        holders = len(e.get("holders") or [])
        parts.append(f'<rect x="{x(t0):.1f}" y="{p3_top}" width="{max(0.5, x(t1) - x(t0)):.1f}" height="14" '
                     f'fill="{color}"/>')
        if holders != 1 and e.get("known"):
            parts.append(f'<rect x="{x(t0):.1f}" y="{p3_top + 16}" width="{max(0.5, x(t1) - x(t0)):.1f}" height="6" '
                         f'fill="{"#e63946" if holders > 1 else "#999"}"/>')
    legend = " ".join(f'<tspan fill="{palette[i % len(palette)]}">&#9632; {html.escape(n)}</tspan>'
                      for i, n in enumerate(ids))
    parts.append(f'<text x="{left}" y="{p3_top + 40}" font-size="10">{legend} <tspan fill="#e63946">&#9632; no '
                 f'leader</tspan></text>')
    # Time axis.
    step = 10 if span <= 300 else 60
    t = 0
    while t <= span:
        parts.append(f'<text x="{x(t_start + t):.1f}" y="{p2_top + p2_h + 14}" font-size="9" text-anchor="middle">{t}s</text>')
        t += step
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'font-family="sans-serif">{"".join(parts)}</svg>')
    rows = "".join(
        f'<tr><td style="color:{"#2a9d8f" if r.ok else "#e63946"}">{"PASS" if r.ok else "FAIL"}</td>'
        f'<td>{html.escape(r.name)}</td><td>{html.escape(r.summary)}</td></tr>' for r in results)
    title = (f"raftpbx chaos: {meta['scenario']} seed {meta['seed']}, {meta['rounds']} rounds, "
             f"{meta['nodes']} nodes ({meta['lab']})")
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title></head>"
            f"<body style=\"font-family:sans-serif\"><h2>{html.escape(title)}</h2>"
            f"<table cellpadding=\"3\">{rows}</table>"
            f"<p>Shaded bands: a fault from injection to heal; dashed lines: cluster recovered (leader agreed and "
            f"every voter converged). Bars: share of REGISTER attempts (SIPp, digest) that succeeded each second.</p>"
            f"{svg}<p>Replay: <code>{html.escape(str(meta.get('replay', '')))}</code></p></body></html>")


def write_all(folder: Path, meta: Json, results: list[CheckResult], history: list[Json]) -> str:
    write_json(folder / "report.json", meta, results, history)
    text = summary_text(meta, results, fault_table(history, results))
    (folder / "summary.txt").write_text(text + "\n")
    (folder / "timeline.html").write_text(timeline_html(meta, results, history))
    return text
