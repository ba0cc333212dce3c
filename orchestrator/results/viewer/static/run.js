// Draws the run page's charts from the JSON the server embedded in #run-data.
(function () {
  const data = JSON.parse(document.getElementById("run-data").textContent);
  const common = { animation: false, plugins: { legend: { display: false } } };
  new Chart(document.getElementById("histogram"), {
    type: "bar",
    data: { labels: data.histogram.labels, datasets: [{ data: data.histogram.counts, backgroundColor: "#2e8b57" }] },
    options: { ...common, scales: { x: { title: { display: true, text: "score (bin start)" } },
                                    y: { title: { display: true, text: "neurons" }, beginAtZero: true } } },
  });
  new Chart(document.getElementById("by-layer"), {
    type: "bar",
    data: { labels: data.layers.labels, datasets: [{ data: data.layers.mean, backgroundColor: "#4682b4" }] },
    options: { ...common, scales: { x: { title: { display: true, text: "layer" } },
                                    y: { title: { display: true, text: "mean score" }, suggestedMin: 0, suggestedMax: 1 } } },
  });
  window.chartsReady = true;
})();
