// Meterline console: draws each chart from the JSON block beside it (no inline scripts: the page's CSP forbids
// them). A chart is <div class="chart" data-series="ID"> with <script type="application/json" id="ID">
// {"x": [unix seconds...], "series": [{"label": "...", "values": [...]}], "unit": "micros" | "count"}. Money
// travels as integer micros and is only formatted here, for display.
(function () {
  "use strict";
  var palette = ["#2457c5", "#17803d", "#b42318", "#7a4b00", "#6b3fa0", "#0f7c8c"];
  function draw(el) {
    var source = document.getElementById(el.dataset.series);
    if (!source || typeof uPlot === "undefined") return;
    var data = JSON.parse(source.textContent);
    var money = data.unit === "micros";
    function usd(v) { return (v < 0 ? "-$" : "$") + (Math.abs(v) / 1e6).toFixed(6); }
    var series = [{}].concat(data.series.map(function (s, i) {
      return { label: s.label, stroke: palette[i % palette.length], width: 2,
               value: function (u, v) { return v == null ? "—" : (money ? usd(v) : v.toLocaleString()); } };
    }));
    var opts = { width: Math.max(el.clientWidth, 320), height: 240, series: series,
                 axes: [{}, { size: 80, values: function (u, vals) {
                   return vals.map(function (v) { return money ? "$" + (v / 1e6).toFixed(2) : v.toLocaleString(); }); } }],
                 scales: { x: { time: true } } };
    var columns = [data.x].concat(data.series.map(function (s) { return s.values; }));
    el.innerHTML = "";
    el.dataset.points = String(data.x.length);
    new uPlot(opts, columns, el);
    el.dataset.drawn = "true";
  }
  function drawAll(root) { (root || document).querySelectorAll(".chart[data-series]").forEach(draw); }
  document.addEventListener("DOMContentLoaded", function () { drawAll(document); });
  document.addEventListener("htmx:afterSwap", function (e) { drawAll(e.target); });
})();
