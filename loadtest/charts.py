#!/usr/bin/env python3
"""Turns the JSON reports of loadtest/compare.sh into the Markdown tables and SVG charts of
PERFORMANCE.md. Standard library only.

    python3 loadtest/charts.py loadtest/results [docs]

Prints the tables on stdout; writes docs/rss-per-connection.svg and
docs/latency-vs-fanout.svg.
"""
import json
import pathlib
import sys

PEERS = ["roomcast", "node-ws", "tungstenite-naive"]
COLORS = {"roomcast": "#d62728", "node-ws": "#1f77b4", "tungstenite-naive": "#7f7f7f"}


def load(results, name):
    path = results / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def ms(us):
    return f"{us / 1000:.1f} ms" if us is not None else "-"


def fanout_row(report):
    r = report["results"]
    lat = r["latency"]
    sat = any("saturated" in w for w in report.get("warnings", []))
    return {
        "cpu": r.get("server_cpu_us_per_delivery"),
        "rate": r["deliveries_per_second"],
        "lost": r["lost"],
        "expected": r["expected"],
        "p50": lat.get("p50_us"),
        "p99": lat.get("p99_us"),
        "storm": r.get("join_storm_seconds"),
        "gen_saturated": sat,
    }


def rss_per_conn(report):
    per_conn = report["results"].get("server_rss_per_connection_bytes")
    return per_conn / 1024 if per_conn is not None else None


def tables(results):
    out = []
    out.append("| server | 1 room x 1,000 subs, 100 msg/s: CPU/delivery | loss | p50 | p99 "
               "| 1 room x 5,000 subs, saturated: CPU/delivery | deliveries/s | join storm (5,000 joins) "
               "| 1,000 rooms x 10, 100 pubs x 10 msg/s: loss | p99 | idle RSS/conn (19,000) |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for peer in PEERS:
        cells = [peer]
        a = load(results, f"fanout-1k--{peer}")
        if a:
            f = fanout_row(a)
            cells += [f"{f['cpu']} us", f"{f['lost']}/{f['expected']}", ms(f["p50"]), ms(f["p99"])]
        else:
            cells += ["-"] * 4
        b = load(results, f"fanout-5k-saturated--{peer}")
        if b:
            f = fanout_row(b)
            star = " (generator saturated: a lower bound)" if f["gen_saturated"] else ""
            cells += [f"{f['cpu']} us", f"{f['rate'] / 1e6:.2f}M{star}", f"{f['storm']:.2f} s"]
        else:
            cells += ["-"] * 3
        c = load(results, f"rooms-1000x10--{peer}")
        if c:
            f = fanout_row(c)
            cells += [f"{f['lost']}/{f['expected']}", ms(f["p99"])]
        else:
            cells += ["-"] * 2
        d = load(results, f"idle-19k--{peer}")
        per = rss_per_conn(d) if d else None
        established = d["results"]["connect"]["established"] if d else None
        cells += [f"{per:.2f} KiB ({established} conns)" if per is not None else "-"]
        out.append("| " + " | ".join(str(c) for c in cells) + " |")
    out.append("")
    out.append("| fan-out size (1 room, 10 msg/s) | " + " | ".join(f"{p} p50 / p99" for p in PEERS) + " |")
    out.append("|---|" + "---|" * len(PEERS))
    for subs in (100, 1000, 5000, 10000):
        cells = [f"{subs:,}"]
        for peer in PEERS:
            rep = load(results, f"latency-vs-fanout-{subs}--{peer}")
            if rep:
                f = fanout_row(rep)
                lost = f" (lost {f['lost']})" if f["lost"] else ""
                cells.append(f"{ms(f['p50'])} / {ms(f['p99'])}{lost}")
            else:
                cells.append("-")
        out.append("| " + " | ".join(cells) + " |")
    out.append("")
    out.append("| idle connections | roomcast RSS per connection |")
    out.append("|---|---|")
    for n in (1000, 5000, 10000, 19000):
        rep = load(results, f"rss-vs-connections-{n}--roomcast")
        per = rss_per_conn(rep) if rep else None
        out.append(f"| {n:,} | {per:.2f} KiB |" if per is not None else f"| {n:,} | - |")
    out.append("")
    out.append("| roomcast, 1 room x 5,000 subs saturated | deliveries/s | server CPU/delivery | server cores used |")
    out.append("|---|---|---|---|")
    for workers in (1, 2):
        rep = load(results, f"workers-{workers}--roomcast")
        if rep:
            f = fanout_row(rep)
            server = rep.get("server") or {}
            cores = server.get("cpu_cores_used")
            out.append(f"| --workers {workers} | {f['rate'] / 1e6:.2f}M | {f['cpu']} us | {cores} |")
    out.append("")
    out.append("| churn (50 workers) | handshakes/s | cycles failed | errors | server CPU/cycle | handshake p50 / p99 | server cores used |")
    out.append("|---|---|---|---|---|---|---|")
    for peer in PEERS:
        rep = load(results, f"churn--{peer}")
        if rep:
            r = rep["results"]
            errors = sum(e.get("count", 0) for e in rep.get("errors", []))
            lat = r.get("handshake_latency", {})
            cores = (rep.get("server") or {}).get("cpu_cores_used")
            out.append(f"| {peer} | {r['handshakes_per_second']:,.0f} | {r['cycles_failed']} | {errors} | "
                       f"{r.get('server_cpu_us_per_cycle')} us | {ms(lat.get('p50_us'))} / {ms(lat.get('p99_us'))} | {cores} |")
    return "\n".join(out)


def svg_chart(path, title, x_label, y_label, series, log_x=False):
    """series: {name: [(x, y), ...]} drawn as lines with points."""
    import math
    width, height, left, right, top, bottom = 640, 400, 70, 20, 40, 60
    points = [p for pts in series.values() for p in pts]
    if not points:
        return
    xs = [math.log10(x) if log_x else x for x, _ in points]
    ys = [y for _, y in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = 0, max(ys) * 1.1 or 1
    if x1 == x0:
        x1 = x0 + 1

    def px(x):
        v = math.log10(x) if log_x else x
        return left + (v - x0) / (x1 - x0) * (width - left - right)

    def py(y):
        return height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="12">',
             f'<rect width="{width}" height="{height}" fill="white"/>',
             f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="15">{title}</text>',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="black"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="black"/>',
             f'<text x="{width / 2}" y="{height - 15}" text-anchor="middle">{x_label}</text>',
             f'<text x="18" y="{height / 2}" text-anchor="middle" transform="rotate(-90 18 {height / 2})">{y_label}</text>']
    for i in range(6):
        y = y0 + (y1 - y0) * i / 5
        parts.append(f'<line x1="{left - 4}" y1="{py(y):.1f}" x2="{width - right}" y2="{py(y):.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{left - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:.3g}</text>')
    for x in sorted({x for x, _ in points}):
        parts.append(f'<text x="{px(x):.1f}" y="{height - bottom + 16}" text-anchor="middle">{x:,}</text>')
    for n, (name, pts) in enumerate(series.items()):
        color = COLORS.get(name.split(" ")[0], "#2ca02c")
        dash = ' stroke-dasharray="5,4"' if "p99" in name else ""
        pts = sorted(pts)
        path_d = " ".join(f"{'M' if i == 0 else 'L'}{px(x):.1f},{py(y):.1f}" for i, (x, y) in enumerate(pts))
        parts.append(f'<path d="{path_d}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
        for x, y in pts:
            parts.append(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}"/>')
        parts.append(f'<text x="{left + 10}" y="{top + 14 + 15 * n}" fill="{color}">{name}</text>')
    parts.append("</svg>")
    path.write_text("\n".join(parts))


def charts(results, docs):
    docs.mkdir(parents=True, exist_ok=True)
    rss = {"roomcast": []}
    for n in (1000, 5000, 10000, 19000):
        rep = load(results, f"rss-vs-connections-{n}--roomcast")
        if rep and rss_per_conn(rep) is not None:
            rss["roomcast"].append((n, rss_per_conn(rep)))
    svg_chart(docs / "rss-per-connection.svg", "roomcast: server RSS per idle connection",
              "idle connections", "KiB per connection", rss)
    latency = {}
    for peer in PEERS:
        for pct in ("p50", "p99"):
            pts = []
            for subs in (100, 1000, 5000, 10000):
                rep = load(results, f"latency-vs-fanout-{subs}--{peer}")
                if rep:
                    f = fanout_row(rep)
                    if f[pct] is not None:
                        pts.append((subs, f[pct] / 1000))
            if pts:
                latency[f"{peer} {pct}"] = pts
    svg_chart(docs / "latency-vs-fanout.svg", "Delivery latency vs fan-out size (1 room, 10 msg/s)",
              "subscribers in the room (log scale)", "latency, ms", latency, log_x=True)


if __name__ == "__main__":
    results = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "loadtest/results")
    docs = pathlib.Path(sys.argv[2] if len(sys.argv) > 2 else "docs")
    print(tables(results))
    charts(results, docs)
