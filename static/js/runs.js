/* The Runs page: the validation-loss curves of the chosen runs drawn together (data from json_script). */
(function () {
  "use strict";
  var COLOURS = ["#2456d6", "#c0392b", "#1f8a4c", "#8e44ad", "#d35400", "#16a085", "#7f8c8d", "#b7950b", "#2c3e50", "#e84393"];

  function build(data) {
    return {
      type: "line",
      data: { datasets: data.runs.map(function (run, i) {
        var colour = COLOURS[i % COLOURS.length];
        return { label: run.label, data: run.data, borderColor: colour, backgroundColor: colour, pointRadius: 3, tension: 0 };
      }) },
      options: { responsive: true, maintainAspectRatio: false, animation: false, parsing: false,
        scales: { x: { type: "linear", title: { display: true, text: "step" }, min: 0 },
                  y: { title: { display: true, text: "validation loss" } } } }
    };
  }

  function init(root) {
    if (typeof Chart === "undefined") return;
    root.querySelectorAll("canvas[data-runs-chart]").forEach(function (canvas) {
      var source = document.getElementById(canvas.dataset.source);
      if (!source || Chart.getChart(canvas)) return;
      new Chart(canvas, build(JSON.parse(source.textContent)));
    });
  }

  document.addEventListener("DOMContentLoaded", function () { htmx.onLoad(init); });
})();
