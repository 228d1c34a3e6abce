// Examples filter: text box, dataset and label selects (and #filter?… links). Sets data-report-ready when done.
(function () {
  "use strict";
  var table = document.getElementById("examples");
  if (table) {
    var text = document.getElementById("ex-text");
    var dataset = document.getElementById("ex-dataset");
    var label = document.getElementById("ex-label");
    var count = document.getElementById("ex-count");
    var rows = Array.prototype.slice.call(table.tBodies[0].rows);
    var apply = function () {
      var q = text.value.trim().toLowerCase(), d = dataset.value, l = label.value, shown = 0;
      rows.forEach(function (row) {
        var ok = (!d || row.getAttribute("data-dataset") === d) &&
          (!l || (" " + row.getAttribute("data-labels") + " ").indexOf(" " + l + " ") >= 0) &&
          (!q || row.textContent.toLowerCase().indexOf(q) >= 0);
        row.classList.toggle("hidden", !ok);
        if (ok) { shown += 1; }
      });
      count.textContent = shown + " of " + rows.length + " examples";
    };
    // A link like report.html#filter?label=refusal&dataset=harmful_test&q=bomb pre-filters.
    if (location.hash.indexOf("#filter?") === 0) {
      var params = new URLSearchParams(location.hash.slice(8));
      text.value = params.get("q") || "";
      dataset.value = params.get("dataset") || "";
      label.value = params.get("label") || "";
    }
    [text, dataset, label].forEach(function (el) {
      el.addEventListener("input", apply);
      el.addEventListener("change", apply);
    });
    apply();
  }
  document.body.setAttribute("data-report-ready", "1");
})();
