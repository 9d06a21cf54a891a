"""
The figures of the pages (dashboard, ablations, report) as inline SVG and HTML strings: bars,
heatmaps, lines, a donut, the SAE frontier, tables, provenance lines, and safe_json for the data
pages carry in script elements. Plain Python (no torch, no plotting dependency); every text that
reaches a figure is escaped.
"""
import json
import math
from html import escape


def bar_chart(rows, width=800, height=240):
    """Bars with error bars: rows [(label, mean, std)], one bar each, first and last labelled."""
    n = len(rows)
    vmax = max((m + s for _, m, s in rows), default=1) or 1
    bw = width / n
    svg = [f'<svg width="{width + 60}" height="{height + 40}"><g transform="translate(50,10)">']
    for i, (label, m, s) in enumerate(rows):
        h, x = height * m / vmax, i * bw
        svg.append(f'<rect x="{x:.1f}" y="{height - h:.1f}" width="{max(bw - 1, 1):.1f}" '
                   f'height="{h:.1f}" fill="#4a78b5">'
                   f'<title>{escape(label)}: {m:.4g} ± {s:.2g}</title></rect>')
        y1, y2 = height - height * (m + s) / vmax, height - height * max(m - s, 0) / vmax
        svg.append(f'<line x1="{x + bw / 2:.1f}" x2="{x + bw / 2:.1f}" y1="{y1:.1f}" y2="{y2:.1f}" '
                   'stroke="#222"/>')
    svg.append(f'<line x1="0" x2="{width}" y1="{height}" y2="{height}" stroke="#000"/>'
               f'<text x="-45" y="10">{vmax:.2g}</text>'
               f'<text x="0" y="{height + 18}">{escape(rows[0][0])}</text>'
               f'<text x="{width - 60}" y="{height + 18}">{escape(rows[-1][0])}</text></g></svg>')
    return "".join(svg)


def heatmap(cells, rows, cols, title=lambda r, c, v: f"{r} {c}: {v:.4g}"):
    """A rows x cols grid of cells {(row, col): value} on one colour scale 0 ... max (white to
    blue); missing cells stay empty."""
    vmax = max(cells.values(), default=1) or 1
    cw, ch = max(6, 800 // max(1, len(cols))), 18
    svg = [f'<svg width="{80 + cw * len(cols)}" height="{24 + ch * len(rows)}" font-size="12">']
    every = math.ceil(30 / cw)  # column labels at least 30 px apart
    for i, c in enumerate(cols[::every]):
        svg.append(f'<text x="{80 + cw * i * every}" y="{ch * len(rows) + 14}">'
                   f'{escape(str(c))}</text>')
    for j, r in enumerate(rows):
        svg.append(f'<text x="0" y="{ch * j + 13}">{escape(str(r))}</text>')
        for i, c in enumerate(cols):
            if (r, c) not in cells:
                continue
            v = cells[(r, c)] / vmax
            col = f"rgb({255 - int(200 * v)},{255 - int(150 * v)},255)"
            svg.append(f'<rect x="{80 + cw * i}" y="{ch * j}" width="{cw - 1}" height="{ch - 1}" '
                       f'fill="{col}"><title>{escape(title(r, c, cells[(r, c)]))}</title></rect>')
    svg.append("</svg>")
    return "".join(svg)


def frontier_chart(rows, width=520, height=300):
    """The SAE frontier: held-out FVU against L0 on log-log axes, one line per expansion, a point
    per k labelled with its dead fraction. rows: [{k, expansion, n_latents, fvu, l0,
    dead_fraction}]. A standalone SVG document (sae.py sweep writes it to a file)."""
    lx = [math.log10(max(r["l0"], 1e-6)) for r in rows]
    ly = [math.log10(max(r["fvu"], 1e-9)) for r in rows]
    (x0, x1), (y0, y1) = ((min(v) - 0.08, max(v) + 0.08) for v in (lx, ly))
    px = lambda r: 70 + width * (math.log10(max(r["l0"], 1e-6)) - x0) / (x1 - x0)
    py = lambda r: 20 + height * (y1 - math.log10(max(r["fvu"], 1e-9))) / (y1 - y0)
    colours = ["#4a78b5", "#d9822b", "#3a9a5b", "#b54a78", "#777"]
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width + 300}" height="{height + 70}" '
           'font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="#fff"/>',
           f'<path d="M70 20V{20 + height}H{70 + width}" fill="none" stroke="#000"/>'
           f'<text x="{70 + width / 2}" y="{height + 60}" text-anchor="middle">L0: active latents '
           'per token (log scale)</text><text x="10" y="12">held-out FVU (log scale)</text>']
    decades = range(math.floor(y0), math.ceil(y1) + 1)
    for t in sorted(t for t in {v * 10 ** e for e in decades for v in (1, 2, 5)}
                    if y0 <= math.log10(t) <= y1):
        y = py(dict(fvu=t))
        svg.append(f'<line x1="66" x2="70" y1="{y:.1f}" y2="{y:.1f}" stroke="#000"/>'
                   f'<text x="62" y="{y + 4:.1f}" text-anchor="end">{t:g}</text>')
    for k in sorted({r["k"] for r in rows}):
        l0 = sum(r["l0"] for r in rows if r["k"] == k) / sum(r["k"] == k for r in rows)
        x = px(dict(l0=l0))
        svg.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{20 + height}" y2="{24 + height}" '
                   f'stroke="#000"/><text x="{x:.1f}" y="{height + 38}" text-anchor="middle">'
                   f'{l0:.1f} (k {k})</text>')
    for i, e in enumerate(sorted({r["expansion"] for r in rows})):
        line = sorted((r for r in rows if r["expansion"] == e), key=lambda r: r["l0"])
        c = colours[i % len(colours)]
        pts = " ".join(f"{px(r):.1f},{py(r):.1f}" for r in line)
        svg.append(f'<polyline points="{pts}" fill="none" stroke="{c}" stroke-width="2"/>'
                   f'<text x="{width + 110}" y="{40 + 18 * i}" fill="{c}">expansion {e} '
                   f'({line[0]["n_latents"]} latents)</text>')
        for r in line:
            tip = (f"k {r['k']}, expansion {e}: FVU {r['fvu']:.4g}, L0 {r['l0']:.2f}, "
                   f"dead {100 * r['dead_fraction']:.1f}%")
            svg.append(f'<circle cx="{px(r):.1f}" cy="{py(r):.1f}" r="4" fill="{c}"><title>'
                       f'{escape(tip)}</title></circle><text x="{px(r) + 7:.1f}" '
                       f'y="{py(r) + 4:.1f}" fill="{c}">{100 * r["dead_fraction"]:.0f}%</text>')
    svg.append(f'<text x="{width + 110}" y="{58 + 18 * i + 18}" fill="#555">labels: the share of '
               'dead latents</text></svg>')
    return "".join(svg)


def site_heatmap(values, what, order):
    """The layer x type grid of one value per adapter, {(layer, target): v}: a row per adapter
    type (in `order`, lora.SITE_ORDER), a column per layer, one colour scale 0 ... max, stated in
    the title."""
    types = [t for t in order if any(t == s for _, s in values)]
    cells = {(t, l): v for (l, t), v in values.items()}
    vmax = max(values.values(), default=0)
    return (f"<h3>{escape(what)}, colour scale 0 … {vmax:.3g}</h3>"
            + heatmap(cells, types, sorted({l for l, _ in values}),
                      lambda t, l, v: f"layer {l} {t}: {v:.4g}"))


def table(head, rows):
    """An HTML table of escaped cells: a header row, then rows of values."""
    th = "".join(f"<th>{escape(str(h))}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table border=1 cellpadding=3><tr>{th}</tr>{body}</table>"


def line_chart(points, xlabel, ylabel, width=520, height=240, ref=None):
    """A polyline through points [(x, y)] on linear axes from 0, with a dashed horizontal line at
    ref (a reference level) when given."""
    xmax = max((x for x, _ in points), default=1) or 1
    ymax = max([y for _, y in points] + [ref or 0]) or 1
    px = lambda x: 60 + width * x / xmax
    py = lambda y: 10 + height * (1 - y / ymax)
    pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in points)
    svg = [f'<svg width="{width + 80}" height="{height + 50}" font-size="12">',
           f'<path d="M60 10V{10 + height}H{60 + width}" fill="none" stroke="#000"/>',
           f'<polyline points="{pts}" fill="none" stroke="#4a78b5" stroke-width="2"/>',
           f'<text x="0" y="16">{ymax:.3g}</text><text x="52" y="{height + 26}">0</text>'
           f'<text x="{50 + width}" y="{height + 26}">{xmax:g}</text>'
           f'<text x="{60 + width / 2}" y="{height + 44}" text-anchor="middle">{escape(xlabel)}'
           f'</text><text x="64" y="24">{escape(ylabel)}</text>']
    if ref is not None:
        svg.append(f'<line x1="60" x2="{60 + width}" y1="{py(ref):.1f}" y2="{py(ref):.1f}" '
                   f'stroke="#d9822b" stroke-dasharray="4 3"><title>{ref:.4g}</title></line>')
    svg.append("</svg>")
    return "".join(svg)


CATEGORY_COLOURS = ["#4a78b5", "#d9822b", "#3a9a5b", "#b54a78", "#8a6bbf", "#c9b22f", "#777"]
UNCATEGORIZED = "uncategorized"  # the latents whose categorisation failed: a grey slice


def donut_chart(shares, sub_shares, size=300):
    """The two-ring donut (docs/paper.md F4): the inner ring holds the categories' shares, the
    outer ring each subcategory's share of its category times the category's share; a legend
    with the percentages. shares {category: share}, sub_shares {category: {subcategory: share
    within}}."""
    c = size / 2

    def arc(a0, a1, r0, r1, colour, tip):
        a1 = min(a1, a0 + 2 * math.pi - 1e-6)
        big = int(a1 - a0 > math.pi)
        p = lambda a, r: f"{c + r * math.sin(a):.2f},{c - r * math.cos(a):.2f}"
        return (f'<path d="M{p(a0, r1)}A{r1},{r1} 0 {big} 1 {p(a1, r1)}L{p(a1, r0)}'
                f'A{r0},{r0} 0 {big} 0 {p(a0, r0)}Z" fill="{colour}" stroke="#fff">'
                f'<title>{escape(tip)}</title></path>')
    svg = [f'<svg width="{size + 330}" height="{max(size, 24 + 18 * len(shares))}" '
           'font-size="12">']
    a = 0.0
    for i, (cat, s) in enumerate(shares.items()):
        colour = "#ccc" if cat == UNCATEGORIZED else CATEGORY_COLOURS[i % len(CATEGORY_COLOURS)]
        svg.append(arc(a, a + 2 * math.pi * s, 0.3 * size / 2, 0.62 * size / 2, colour,
                       f"{cat}: {100 * s:.1f}%"))
        b = a
        for sub, t in (sub_shares.get(cat) or {}).items():
            svg.append(arc(b, b + 2 * math.pi * s * t, 0.64 * size / 2, size / 2 - 2, colour,
                           f"{cat} / {sub}: {100 * s * t:.1f}% ({100 * t:.0f}% of {cat})"))
            b += 2 * math.pi * s * t
        a += 2 * math.pi * s
        svg.append(f'<rect x="{size + 16}" y="{10 + 18 * i}" width="12" height="12" '
                   f'fill="{colour}"/><text x="{size + 34}" y="{21 + 18 * i}">'
                   f'{escape(cat)} {100 * s:.1f}%</text>')
    svg.append("</svg>")
    return "".join(svg)


def provenance_lines(made_from, prefix=""):
    """[[name, value]] lines of a made_from record, for the page: paths with the start of their
    checksum, settings as they are."""
    out = []
    for k, v in made_from.items():
        if isinstance(v, dict) and "path" in v:
            sums = [f"{n} {h[:12]}" for n, h in v.items() if "sha256" in n and isinstance(h, str)]
            out.append([prefix + k, v["path"] + (f" ({', '.join(sums)})" if sums else "")])
            if isinstance(v.get("made_from"), dict):
                out += provenance_lines(v["made_from"], prefix + k + ".")
        elif isinstance(v, dict):
            out += provenance_lines(v, prefix + k + ".")
        elif v is not None:
            out.append([prefix + k, str(v)])
    return out


def safe_json(obj):
    """JSON that can sit inside a <script> element: no text in it can close the element."""
    return (json.dumps(obj, ensure_ascii=False)
            .replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e"))
