// The attention trace of a message as a heatmap: one cell per layer (row) and head
// (column), coloured by the head's mean entropy over the traced tokens (darker: more
// spread out), outlined where its entropy jumped (flagged). A click lists, per traced
// token, the tokens that head attended to most. Everything is built as DOM nodes.

function text(tag, content, cls) {
  const node = document.createElement(tag);
  node.textContent = content;
  if (cls) node.className = cls;
  return node;
}

function mean(values) {
  return values.length ? values.reduce((a, b) => a + b, 0) / values.length : 0;
}

function tokenText(trace, position) {
  const token = (trace.tokens || [])[position];
  return token === undefined ? `#${position}` : JSON.stringify(token);
}

/** The heatmap of `trace` (the server's debug_trace) as a DOM element. */
export function renderHeatmap(trace) {
  const box = document.createElement("div");
  box.className = "heatmap";
  const layers = trace.layers || [];
  const means = layers.map((l) => l.heads.map((h) => mean(h.entropy)));
  const top = Math.max(1e-6, ...means.flat());
  box.append(text("div", `Attention entropy: ${layers.length} layers × ${trace.num_heads} heads, `
    + `${trace.positions.length} traced tokens; ${trace.anomalies.length} entropy jumps `
    + `> ${trace.entropy_jump} (outlined). Click a head.`, "note"));
  const table = document.createElement("table");
  const header = document.createElement("tr");
  header.append(text("th", ""));
  for (let h = 0; h < trace.num_heads; h += 1) header.append(text("th", `h${h}`));
  table.append(header);
  const details = document.createElement("div");
  details.className = "details";
  layers.forEach((layer, l) => {
    const row = document.createElement("tr");
    row.append(text("th", `L${l}`));
    layer.heads.forEach((head, h) => {
      const cell = document.createElement("td");
      const shade = Math.round(255 - 200 * (means[l][h] / top));
      cell.style.backgroundColor = `rgb(${shade}, ${shade}, 255)`;   // CSSOM: allowed by the CSP
      cell.title = `layer ${l} head ${h}: mean entropy ${means[l][h].toFixed(3)} nats`;
      cell.dataset.layer = l;
      cell.dataset.head = h;
      if (head.flagged.length) cell.classList.add("flagged");
      cell.addEventListener("click", () => showHead(details, trace, l, h));
      row.append(cell);
    });
    table.append(row);
  });
  box.append(table, details);
  return box;
}

function showHead(details, trace, l, h) {
  const head = trace.layers[l].heads[h];
  const list = document.createElement("ol");
  trace.positions.forEach((position, t) => {
    const attended = head.top[t].slice(0, 4)
      .map(([p, w]) => `${tokenText(trace, p)} ${(w * 100).toFixed(0)}%`).join(", ");
    const flag = head.flagged.includes(t) ? "  ⚑ entropy jump" : "";
    list.append(text("li", `${tokenText(trace, position)} (H=${head.entropy[t].toFixed(2)}) → `
      + `${attended}${flag}`));
  });
  details.replaceChildren(text("div", `Layer ${l}, head ${h}: top attended tokens per traced token`), list);
}
