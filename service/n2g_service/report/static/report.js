// Sorting and filtering of the report's neuron table. Local file, no dependencies, no network.
(function () {
  "use strict";
  function cellValue(row, i, type) {
    const cell = row.cells[i];
    const raw = cell.hasAttribute("data-v") ? cell.getAttribute("data-v") : cell.textContent.trim();
    if (type === "num") { const v = parseFloat(raw); return isNaN(v) ? -Infinity : v; }
    return raw.toLowerCase();
  }
  function makeSortable(table) {
    const heads = table.tHead.rows[0].cells;
    Array.prototype.forEach.call(heads, function (th, i) {
      th.addEventListener("click", function () {
        const type = th.getAttribute("data-type") || "text";
        const asc = th.getAttribute("aria-sort") !== "ascending";
        Array.prototype.forEach.call(heads, function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", asc ? "ascending" : "descending");
        const body = table.tBodies[0];
        const rows = Array.prototype.slice.call(body.rows);
        const keyed = rows.map(function (r, j) { return [cellValue(r, i, type), j, r]; });
        keyed.sort(function (a, b) {
          if (a[0] < b[0]) return asc ? -1 : 1;
          if (a[0] > b[0]) return asc ? 1 : -1;
          return a[1] - b[1];
        });
        const frag = document.createDocumentFragment();
        keyed.forEach(function (k) { frag.appendChild(k[2]); });
        body.appendChild(frag);
      });
    });
  }
  function setUpFilter(table) {
    const q = document.getElementById("q");
    const layer = document.getElementById("layer-filter");
    const minF1 = document.getElementById("min-f1");
    const count = document.getElementById("count");
    if (!q || !layer || !minF1) return;
    function apply() {
      const words = q.value.toLowerCase().split(/\s+/).filter(Boolean);
      const l = layer.value;
      const m = parseFloat(minF1.value) || 0;
      let shown = 0;
      Array.prototype.forEach.call(table.tBodies[0].rows, function (r) {
        const text = r.getAttribute("data-search") || "";
        const ok = (!l || r.getAttribute("data-layer") === l) &&
          (m <= 0 || parseFloat(r.getAttribute("data-f1")) >= m) &&
          words.every(function (w) { return text.indexOf(w) >= 0; });
        r.hidden = !ok;
        if (ok) shown++;
      });
      if (count) count.textContent = shown + " of " + table.tBodies[0].rows.length + " neurons";
    }
    q.addEventListener("input", apply);
    layer.addEventListener("change", apply);
    minF1.addEventListener("input", apply);
    apply();
  }
  document.querySelectorAll("table.sortable").forEach(makeSortable);
  const neurons = document.getElementById("neurons");
  if (neurons) setUpFilter(neurons);
})();
