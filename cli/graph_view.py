"""What ``snnopt inspect`` and ``snnopt compile --graph`` show: the graph before and after, and
which traced nodes each fused op replaced, as text, JSON, Graphviz DOT, SVG or HTML.

The view is plain data (:func:`build_view`), so an emitted package can carry it (``inspect.json``)
and ``snnopt inspect DIR`` shows it without the model file. The SVG is drawn here, from a layered
layout (rank = longest path from an input), so no Graphviz program is needed; the DOT text is for
those who have one.

Example::

    >>> view = build_view(model, inputs, optimized)
    >>> Path("graph.svg").write_text(render(view, "svg"))
"""

from __future__ import annotations

import html
import json
from collections import Counter

FORMATS = ("text", "json", "svg", "dot", "html")


def _target(node) -> str:
    target = node.target
    if node.op in ("call_method", "call_module", "get_attr", "placeholder", "output"):
        return str(target)
    name = getattr(target, "__name__", str(target))
    return "getitem" if name == "getitem" else name


def _inputs(node) -> list:
    return [a.name for a in node.all_input_nodes]


def _graph_nodes(gm, layer_of: dict) -> list:
    return [{"name": n.name, "op": n.op, "target": _target(n), "inputs": _inputs(n), "layer": layer_of.get(n.name)}
            for n in gm.graph.nodes]


def build_view(model, inputs, optimized, title: str = "model") -> dict:
    """Before/after graphs, layers and skipped regions of one ``optimize`` run, as plain data."""
    from snnopt import explain
    from snnopt.passes.trace import trace_model

    report = explain(optimized)
    original_layer = {name: layer.index for layer in report.layers for name in layer.original_nodes}
    fused_layer = {layer.node: layer.index for layer in report.layers}
    before, before_problem = None, None
    try:
        traced, _, _ = trace_model(model, inputs)
        before = _graph_nodes(traced, original_layer)
    except Exception as error:  # the model left whole: say why instead of a graph
        before_problem = f"{type(error).__name__}: {error}"
    return {"title": title, "report": report.to_dict(), "before": before, "before_problem": before_problem,
            "after": _graph_nodes(optimized, fused_layer)}


# ------------------------------------------------------------------------------------ text & json


def _layer_line(layer: dict) -> str:
    parts = [f"{layer['kind']}{' recurrent' if layer['recurrent'] else ''}", f"{layer['neurons']} neurons",
             f"beta={layer['beta']}"]
    if layer["threshold"] is not None:
        parts += [f"threshold={layer['threshold']}", f"reset={layer['reset']}", f"surrogate={layer['surrogate']}"]
    parts.append(f"backward={layer['backward']}" + (f" window={layer['window']:g}" if layer["window"] is not None else ""))
    return ", ".join(parts)


def _op_counts(names: list, nodes: list) -> str:
    by_name = {n["name"]: n for n in nodes or []}
    counts = Counter(by_name[name]["target"] if name in by_name else name.rstrip("_0123456789") for name in names)
    return ", ".join(f"{op}×{count}" for op, count in counts.most_common())


def render_text(view: dict) -> str:
    from snnopt.report import FusedLayer, Report, SkippedRegion

    r = view["report"]
    report = Report(**{**r, "layers": [FusedLayer(**l) for l in r["layers"]],
                       "skipped": [SkippedRegion(**s) for s in r["skipped"]]})
    lines = [f"{view['title']}", "", str(report), ""]
    before = view["before"]
    if before is None:
        lines.append(f"Graph before: not traceable ({view['before_problem']})")
    else:
        lines.append(f"Graph before: {len(before)} traced nodes; "
                     f"{sum(1 for n in before if n['layer'] is not None)} of them replaced by fused ops")
    lines += ["", f"Graph after ({len(view['after'])} nodes):"]
    layers = {l["index"]: l for l in r["layers"]}
    for node in view["after"]:
        args = ", ".join(node["inputs"])
        line = f"  {node['name']} = {node['op']} {node['target']}({args})"
        if node["layer"] is not None:
            layer = layers[node["layer"]]
            line += f"\n      layer {layer['index']}: {_layer_line(layer)}"
            line += (f"\n      replaces {len(layer['original_nodes'])} traced nodes: "
                     f"{_op_counts(layer['original_nodes'], before)}")
        lines.append(line)
    return "\n".join(lines) + "\n"


def render_json(view: dict) -> str:
    return json.dumps(view, indent=2) + "\n"


# ------------------------------------------------------------------------------------ drawing


def _panel_nodes(view: dict, which: str) -> tuple[list, list]:
    """(boxes, edges) of one panel; the 'before' panel collapses each layer's nodes into one box."""
    layers = {l["index"]: l for l in view["report"]["layers"]}
    nodes = view[which] or []
    boxes, edges, alias = [], set(), {}
    for node in nodes:
        if which == "before" and node["layer"] is not None:
            key = f"layer_{node['layer']}"
            alias[node["name"]] = key
            if not any(b["id"] == key for b in boxes):
                layer = layers[node["layer"]]
                boxes.append({"id": key, "kind": "replaced",
                              "lines": [f"layer {layer['index']}: {len(layer['original_nodes'])} traced nodes",
                                        _op_counts(layer["original_nodes"], nodes)[:70]]})
        else:
            alias[node["name"]] = node["name"]
            if node["layer"] is not None:
                layer = layers[node["layer"]]
                lines = [f"{node['name']}: {layer['kind']}{' recurrent' if layer['recurrent'] else ''} "
                         f"({layer['neurons']} neurons)", f"β={layer['beta']}"]
                if layer["threshold"] is not None:
                    lines[-1] += f"  θ={layer['threshold']}  reset {layer['reset']}"
                    lines.append(f"surrogate {layer['surrogate']}  backward {layer['backward']}"
                                 + (f" (window {layer['window']:g})" if layer["window"] is not None else ""))
                lines.append(f"replaces {len(layer['original_nodes'])} traced nodes")
                kind = "fused"
            else:
                lines = [f"{node['name']}" + ("" if node["target"] == node["name"] else f": {node['target']}")]
                kind = {"placeholder": "io", "output": "io", "get_attr": "weight"}.get(node["op"], "op")
            boxes.append({"id": node["name"], "kind": kind, "lines": lines})
        for source in node["inputs"]:
            if alias.get(source) and alias[source] != alias[node["name"]]:
                edges.add((alias[source], alias[node["name"]]))
    return boxes, sorted(edges)


_FILL = {"fused": "#ffd8a8", "replaced": "#ffe8cc", "io": "#d0ebff", "weight": "#f1f3f5", "op": "#ffffff"}
_CHAR, _LINE, _PAD, _GAP_X, _GAP_Y = 7.4, 15, 8, 24, 36


def _layout(boxes: list, edges: list) -> tuple[dict, float, float]:
    rank = {b["id"]: 0 for b in boxes}
    for _ in range(len(boxes)):  # longest path; boxes come in graph order, so this settles quickly
        changed = False
        for source, target in edges:
            if rank[target] < rank[source] + 1:
                rank[target], changed = rank[source] + 1, True
        if not changed:
            break
    rows: dict = {}
    for b in boxes:
        b["w"] = max(len(line) for line in b["lines"]) * _CHAR + 2 * _PAD
        b["h"] = len(b["lines"]) * _LINE + _PAD
        rows.setdefault(rank[b["id"]], []).append(b)
    width = max((sum(b["w"] for b in row) + _GAP_X * (len(row) - 1) for row in rows.values()), default=0)
    y, placed = 0.0, {}
    for r in sorted(rows):
        row = rows[r]
        x = (width - (sum(b["w"] for b in row) + _GAP_X * (len(row) - 1))) / 2
        for b in row:
            placed[b["id"]] = (x, y, b)
            x += b["w"] + _GAP_X
        y += max(b["h"] for b in row) + _GAP_Y
    return placed, width, y - _GAP_Y


def _svg_panel(boxes: list, edges: list, dx: float, dy: float) -> list:
    placed, width, height = _layout(boxes, edges)
    parts = []
    for source, target in edges:
        x1, y1, b1 = placed[source]
        x2, y2, b2 = placed[target]
        sx, sy, tx, ty = dx + x1 + b1["w"] / 2, dy + y1 + b1["h"], dx + x2 + b2["w"] / 2, dy + y2
        middle = (sy + ty) / 2
        parts.append(f'<path d="M{sx:.1f},{sy:.1f} C{sx:.1f},{middle:.1f} {tx:.1f},{middle:.1f} {tx:.1f},{ty - 2:.1f}" '
                     'fill="none" stroke="#495057" stroke-width="1" marker-end="url(#arrow)"/>')
    for x, y, b in placed.values():
        stroke = "#e8590c" if b["kind"] in ("fused", "replaced") else "#868e96"
        parts.append(f'<rect x="{dx + x:.1f}" y="{dy + y:.1f}" width="{b["w"]:.1f}" height="{b["h"]:.1f}" rx="5" '
                     f'fill="{_FILL[b["kind"]]}" stroke="{stroke}"/>')
        for i, line in enumerate(b["lines"]):
            weight = ' font-weight="bold"' if i == 0 and b["kind"] in ("fused", "replaced") else ""
            parts.append(f'<text x="{dx + x + _PAD:.1f}" y="{dy + y + _PAD / 2 + (i + 0.8) * _LINE:.1f}"{weight}>'
                         f'{html.escape(line)}</text>')
    return parts, width, height


def render_svg(view: dict, panels=("before", "after")) -> str:
    """An SVG drawing of the chosen panels side by side."""
    pieces, x, height = [], 10.0, 0.0
    for which in panels:
        if which == "before" and view["before"] is None:
            boxes, edges = [{"id": "none", "kind": "op", "lines": ["not traceable:", view["before_problem"][:90]]}], []
        else:
            boxes, edges = _panel_nodes(view, which)
        parts, width, panel_height = _svg_panel(boxes, edges, x, 40)
        title = "before (traced)" if which == "before" else "after (snnopt.optimize)"
        pieces.append(f'<text x="{x:.1f}" y="24" font-size="15" font-weight="bold">{html.escape(title)}</text>')
        pieces += parts
        x += max(width, 200) + 40
        height = max(height, panel_height)
    header = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{x:.0f}" height="{height + 60:.0f}" '
              'font-family="DejaVu Sans Mono, Menlo, Consolas, monospace" font-size="12">'
              '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
              'orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#495057"/></marker></defs>'
              f'<rect width="100%" height="100%" fill="white"/>')
    return header + "\n" + "\n".join(pieces) + "\n</svg>\n"


def render_dot(view: dict, panels=("before", "after")) -> str:
    lines = ["digraph snnopt {", "  rankdir=TB;", '  node [shape=box, style="rounded,filled", fontname="monospace"];']
    for which in panels:
        if which == "before" and view["before"] is None:
            continue
        boxes, edges = _panel_nodes(view, which)
        lines.append(f'  subgraph cluster_{which} {{ label="{which}";')
        for b in boxes:
            label = "\\n".join(line.replace('"', "'") for line in b["lines"])
            lines.append(f'    "{which}.{b["id"]}" [label="{label}", fillcolor="{_FILL[b["kind"]]}"];')
        lines += [f'    "{which}.{s}" -> "{which}.{t}";' for s, t in edges]
        lines.append("  }")
    return "\n".join(lines + ["}"]) + "\n"


def render_html(view: dict, panels=("before", "after")) -> str:
    layers = view["report"]["layers"]
    rows = "".join(f"<tr><td>{l['index']}</td><td>{html.escape(l['node'])}</td><td>{html.escape(_layer_line(l))}</td>"
                   f"<td>{html.escape(_op_counts(l['original_nodes'], view['before']))}</td>"
                   f"<td>{html.escape(l['source'] or '-')}</td></tr>" for l in layers)
    skipped = "".join(f"<li><b>{html.escape(s['region'])}</b>: {html.escape(s['reason'])}"
                      f"{' at ' + html.escape(s['source']) if s['source'] else ''}</li>"
                      for s in view["report"]["skipped"]) or "<li>nothing</li>"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>snnopt: {html.escape(view['title'])}</title>"
            "<style>body{font-family:sans-serif;margin:2em}td,th{border:1px solid #ccc;padding:4px 8px;"
            "vertical-align:top}table{border-collapse:collapse}</style></head><body>"
            f"<h1>snnopt: {html.escape(view['title'])}</h1><h2>Fused layers</h2><table><tr><th>#</th><th>node</th>"
            f"<th>dynamics</th><th>replaced traced nodes</th><th>source</th></tr>{rows}</table>"
            f"<h2>Left as written</h2><ul>{skipped}</ul><h2>Graph</h2>{render_svg(view, panels)}</body></html>\n")


def render(view: dict, fmt: str, panels=("before", "after")) -> str:
    if fmt == "text":
        return render_text(view)
    if fmt == "json":
        return render_json(view)
    return {"svg": render_svg, "dot": render_dot, "html": render_html}[fmt](view, panels)
