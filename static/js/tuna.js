/* LLM Tuna page behaviour. Everything hooks in through htmx.onLoad, so swapped-in fragments work too. */
(function () {
  "use strict";

  function readJson(id) {
    var el = document.getElementById(id);
    return el ? JSON.parse(el.textContent) : null;
  }

  // -- Charts: <canvas data-chart="histogram|loss|..." data-source="json-script-id"> -------------
  var builders = {
    histogram: function (data) {
      var labels = data.edges.slice(0, -1).map(function (lo, i) { var hi = data.edges[i + 1] - 1; return hi > lo ? lo + "–" + hi : String(lo); });
      return {
        type: "bar",
        data: { labels: labels, datasets: [
          { label: "Prompt tokens", data: data.prompt, backgroundColor: "rgba(36,86,214,.7)" },
          { label: "Completion tokens", data: data.completion, backgroundColor: "rgba(31,138,76,.7)" }
        ] },
        options: { responsive: true, maintainAspectRatio: false, animation: false,
          scales: { x: { title: { display: true, text: "tokens per example" } }, y: { title: { display: true, text: "examples" }, beginAtZero: true } } }
      };
    },
    loss: function (data) {
      return {
        type: "line",
        data: { datasets: [
          { label: "Training loss", data: data.train, borderColor: "#2456d6", backgroundColor: "#2456d6", pointRadius: 2, tension: 0 },
          { label: "Validation loss", data: data.eval, borderColor: "#c0392b", backgroundColor: "#c0392b", pointRadius: 4, showLine: true }
        ] },
        options: { responsive: true, maintainAspectRatio: false, animation: false, parsing: false,
          scales: { x: { type: "linear", title: { display: true, text: "step" }, min: 0, suggestedMax: data.total_steps || undefined },
                    y: { title: { display: true, text: "loss" } } } }
      };
    },
    bars: function (data) {
      return {
        type: "bar",
        data: { labels: data.labels, datasets: data.datasets },
        options: { responsive: true, maintainAspectRatio: false, animation: false, scales: { y: { beginAtZero: true } } }
      };
    }
  };

  function initCharts(root) {
    if (typeof Chart === "undefined") return;
    root.querySelectorAll("canvas[data-chart]").forEach(function (canvas) {
      var data = readJson(canvas.dataset.source);
      if (!data) return;
      var existing = Chart.getChart(canvas);
      if (existing) {
        // Live charts: replace the data, keep the chart (no flicker on polling).
        var fresh = builders[canvas.dataset.chart](data);
        existing.data.datasets.forEach(function (ds, i) { ds.data = fresh.data.datasets[i].data; });
        if (fresh.data.labels) existing.data.labels = fresh.data.labels;
        existing.update();
        return;
      }
      new Chart(canvas, builders[canvas.dataset.chart](data));
    });
  }

  // A live chart's data lives in a polled fragment; the canvas stays put and re-reads it.
  document.addEventListener("htmx:afterSettle", function () { initCharts(document); });

  // -- Drop zone: drop or choose a file, submit the form through htmx, show upload progress ----
  function initDropzone(root) {
    root.querySelectorAll("[data-dropzone]").forEach(function (zone) {
      if (zone.dataset.ready) return;
      zone.dataset.ready = "1";
      var form = zone.closest("form");
      var input = form.querySelector("input[type=file]");
      var label = zone.querySelector("[data-dropzone-label]");
      function submit() {
        if (!input.files.length) return;
        label.textContent = input.files[0].name;
        htmx.trigger(form, "submit");
      }
      zone.addEventListener("click", function () { input.click(); });
      zone.addEventListener("keydown", function (e) { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); } });
      input.addEventListener("change", submit);
      ["dragenter", "dragover"].forEach(function (t) {
        zone.addEventListener(t, function (e) { e.preventDefault(); zone.classList.add("is-over"); });
      });
      ["dragleave", "drop"].forEach(function (t) {
        zone.addEventListener(t, function (e) { e.preventDefault(); zone.classList.remove("is-over"); });
      });
      zone.addEventListener("drop", function (e) {
        if (!e.dataTransfer || !e.dataTransfer.files.length) return;
        input.files = e.dataTransfer.files;
        submit();
      });
      var bar = form.querySelector("[data-progress]");
      form.addEventListener("htmx:xhr:progress", function (e) {
        if (!bar || !e.detail.lengthComputable) return;
        bar.parentElement.hidden = false;
        bar.style.width = Math.round((e.detail.loaded / e.detail.total) * 100) + "%";
      });
      form.addEventListener("htmx:afterRequest", function () { input.value = ""; if (bar) { bar.style.width = "100%"; } });
    });
  }

  // -- Evaluation viewer: arrow keys move between examples, A / B vote; "jump to" swaps in place --
  document.addEventListener("keydown", function (e) {
    var target = e.target;
    if (e.ctrlKey || e.metaKey || e.altKey || (target && /^(INPUT|TEXTAREA|SELECT)$/.test(target.tagName))) return;
    var selector = { ArrowLeft: "[data-nav=prev]", ArrowRight: "[data-nav=next]", a: "[data-vote=A]", b: "[data-vote=B]" }[e.key];
    var el = selector && document.querySelector("#example-view " + selector);
    if (el) { e.preventDefault(); el.click(); }
  });
  document.addEventListener("submit", function (e) {
    var form = e.target.closest("form[data-jump]");
    if (!form) return;
    e.preventDefault();
    var n = parseInt(form.example.value, 10) - 1;
    if (isNaN(n) || n < 0) return;
    htmx.ajax("GET", form.dataset.jump + n + "?blind=" + form.dataset.blind, "#example-view");
  });

  // -- Playground: the code snippets follow the model picked in the form --
  document.addEventListener("change", function (e) {
    if (!e.target.matches("select[data-snippet-source]")) return;
    document.querySelectorAll("[data-snippet-model]").forEach(function (el) { el.textContent = e.target.value; });
  });

  // -- Polling ("every 2s") pauses while the tab is hidden. Done here rather than with an hx-trigger filter
  // ("[document.visibilityState === 'visible']"), which htmx evaluates with eval: the CSP allows no eval.
  document.addEventListener("htmx:beforeRequest", function (e) {
    var trigger = e.detail.elt.getAttribute("hx-trigger") || "";
    if (document.visibilityState !== "visible" && /^\s*every\s/.test(trigger)) e.preventDefault();
  });

  // -- Progress bars: <div class="progress"><span data-width="42.5"> (a percentage; no style="": the CSP) --
  // Set as soon as a bar enters the page (a MutationObserver runs before the next paint), so a polled fragment's
  // bar never shows at 0 in between.
  function initWidths(root) {
    var bars = Array.prototype.slice.call(root.querySelectorAll("[data-width]"));
    if (root.matches && root.matches("[data-width]")) bars.push(root);
    bars.forEach(function (bar) { bar.style.width = Math.max(0, Math.min(100, parseFloat(bar.dataset.width) || 0)) + "%"; });
  }
  initWidths(document);
  new MutationObserver(function (mutations) {
    mutations.forEach(function (m) {
      m.addedNodes.forEach(function (node) { if (node.nodeType === 1) initWidths(node); });
    });
  }).observe(document.documentElement, { childList: true, subtree: true });

  document.addEventListener("DOMContentLoaded", function () {
    htmx.onLoad(function (root) {
      initCharts(root);
      initDropzone(root);
    });
  });
})();
