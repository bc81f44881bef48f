// The dataflow graph as inline SVG: a layered layout, sources in the left column, sinks in the
// right one, every other operator one column right of its furthest input.
"use strict";

const SVG_NS = "http://www.w3.org/2000/svg";
const NODE_W = 190;
const NODE_H = 78;
const COL_GAP = 70;
const ROW_GAP = 24;
const MARGIN = 12;

function svg(tag, attrs, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
  if (text !== undefined) node.textContent = text;
  return node;
}

/** Column of every operator: sources 0, sinks the last, others 1 + their inputs' furthest. */
function layers(graph) {
  const inputs = new Map(graph.operators.map((op) => [op.id, []]));
  for (const edge of graph.edges) inputs.get(edge.to).push(edge.from);
  const column = new Map();
  // Operators come in file order, inputs first (the pipeline is validated so), one pass suffices.
  for (const op of graph.operators) {
    const ups = inputs.get(op.id);
    column.set(op.id, ups.length === 0 ? 0 : 1 + Math.max(...ups.map((u) => column.get(u) ?? 0)));
  }
  const last = Math.max(0, ...column.values());
  for (const op of graph.operators) if (op.role === "sink") column.set(op.id, last);
  return column;
}

/** Draw `graph` ({operators, edges}) with `metrics` ({operator id: OperatorMetrics}) into `root`. */
function drawGraph(root, graph, metrics) {
  const column = layers(graph);
  const rows = new Map();
  const place = new Map();
  for (const op of graph.operators) {
    const c = column.get(op.id);
    const r = rows.get(c) || 0;
    rows.set(c, r + 1);
    place.set(op.id, { c, r });
  }
  const tallest = Math.max(1, ...rows.values());
  const height = MARGIN * 2 + tallest * NODE_H + (tallest - 1) * ROW_GAP;
  const columns = Math.max(1, ...[...column.values()].map((c) => c + 1));
  const width = MARGIN * 2 + columns * NODE_W + (columns - 1) * COL_GAP;
  const xy = (id) => {
    const { c, r } = place.get(id);
    const inColumn = rows.get(c);
    const top = (height - (inColumn * NODE_H + (inColumn - 1) * ROW_GAP)) / 2;
    return { x: MARGIN + c * (NODE_W + COL_GAP), y: top + r * (NODE_H + ROW_GAP) };
  };

  root.setAttribute("viewBox", `0 0 ${width} ${height}`);
  root.setAttribute("width", width);
  root.setAttribute("height", height);
  const defs = svg("defs");
  const marker = svg("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" });
  marker.append(svg("path", { d: "M 0 0 L 10 5 L 0 10 z", class: "arrow" }));
  defs.append(marker);
  const parts = [defs];

  for (const edge of graph.edges) {
    const a = xy(edge.from);
    const b = xy(edge.to);
    const x1 = a.x + NODE_W, y1 = a.y + NODE_H / 2, x2 = b.x, y2 = b.y + NODE_H / 2;
    const bend = Math.max(20, (x2 - x1) / 2);
    parts.push(svg("path", {
      class: "edge", "data-from": edge.from, "data-to": edge.to, "marker-end": "url(#arrow)",
      d: `M ${x1} ${y1} C ${x1 + bend} ${y1}, ${x2 - bend} ${y2}, ${x2} ${y2}`,
    }));
  }

  for (const op of graph.operators) {
    const { x, y } = xy(op.id);
    const m = metrics[op.id] || {};
    const g = svg("g", { class: `op op-${op.role}`, "data-op": op.id, transform: `translate(${x} ${y})` });
    g.append(svg("rect", { width: NODE_W, height: NODE_H, rx: 6 }));
    g.append(svg("text", { x: 10, y: 18, class: "op-id" }, op.id));
    g.append(svg("text", { x: 10, y: 35, class: "op-type" }, `${op.type} ×${op.parallelism ?? "?"}`));
    // A source only emits and a sink only receives: show the side that means something.
    const rates = [
      op.role === "source" ? null : `in ${fmtRate(m.records_in_per_s)}/s`,
      op.role === "sink" ? null : `out ${fmtRate(m.records_out_per_s)}/s`,
    ].filter((part) => part !== null);
    g.append(svg("text", { x: 10, y: 53, class: "op-rate" }, rates.join(" · ")));
    g.append(svg("text", { x: 10, y: 70, class: "op-health" }, `backpressure ${fmtPercent(m.backpressure)} · lag ${fmtSeconds(m.watermark_lag_s)}`));
    parts.push(g);
  }
  root.replaceChildren(...parts);
}
