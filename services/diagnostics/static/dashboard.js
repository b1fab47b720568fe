// Draws a run's dashboard (or several runs overlaid) with Plotly from GET /v1/runs/<run>/series and redraws it
// every refresh_s seconds while the page is open. Served by the diagnostics service; loads nothing else.
(function () {
  "use strict";
  const cfg = JSON.parse(document.getElementById("dashboard-config").textContent);
  const colors = ["#1565c0", "#e65100", "#2e7d32", "#6a1b9a", "#c62828", "#00838f", "#5d4037", "#ad1457"];
  const dashes = ["solid", "dot", "dash", "longdash", "dashdot"];
  const MARKERS_UP_TO = 300; // point markers only while they stay readable

  function fmt(v) {
    if (v === null || v === undefined) return "n/a";
    if (v === 0 || (Math.abs(v) >= 1e-3 && Math.abs(v) < 1e4)) return String(Number(v.toPrecision(4)));
    return v.toExponential(3);
  }

  function text(tag, content, cls) {
    const el = document.createElement(tag);
    el.textContent = content;
    if (cls) el.className = cls;
    return el;
  }

  async function fetchSeries(run) {
    const url = cfg.base + "/v1/runs/" + encodeURIComponent(run) + "/series?max_points=" + cfg.max_points;
    const reply = await fetch(url, { headers: { accept: "application/json" } });
    const body = await reply.json();
    if (!reply.ok) throw new Error(run + ": " + (body.error || reply.status));
    return body;
  }

  function traces(chart, all) {
    const out = [];
    all.forEach((s, r) => {
      // an "eval" chart has a point per held-out evaluation (at the step it ran after), the others one per batch
      const x = chart.x === "eval" ? s.eval_steps || [] : s.steps;
      chart.fields.forEach(([name, label], k) => {
        let y = (chart.x === "eval" ? s.evaluations || {} : s.fields)[name];
        if (!y || y.every((v) => v === null)) return;
        if (chart.axis === "log") y = y.map((v) => (v !== null && v > 0 ? v : null));
        const shown = all.length > 1 ? s.run_id + ": " + label : label;
        out.push({
          x: x,
          y: y,
          name: shown,
          type: "scatter",
          mode: x.length <= MARKERS_UP_TO || chart.x === "eval" ? "lines+markers" : "lines",
          marker: { size: 4 },
          line: { color: colors[(all.length > 1 ? r : k) % colors.length], dash: dashes[(all.length > 1 ? k : r) % dashes.length], width: 1.6 },
          hovertemplate: label + " %{y:.4g}<br>step %{x}<extra>" + s.run_id.replace(/</g, "&lt;") + "</extra>",
        });
      });
    });
    return out;
  }

  function layout(chart) {
    const shapes = [];
    if (chart.threshold !== null) {
      shapes.push({ type: "line", xref: "paper", x0: 0, x1: 1, y0: chart.threshold, y1: chart.threshold, line: { color: "#d33", dash: "dash", width: 1 } });
    }
    return {
      title: { text: chart.title, font: { size: 13 } },
      width: 480, height: 280, margin: { l: 56, r: 12, t: 36, b: 36 },
      xaxis: { automargin: true },
      yaxis: chart.axis === "log" ? { type: "log", exponentformat: "power" } : (chart.range ? { range: chart.range } : {}),
      shapes: shapes, hovermode: "closest", showlegend: true, legend: { orientation: "h", y: -0.15, font: { size: 10 } },
    };
  }

  function describe(all) {
    const status = document.getElementById("status");
    const first = all[0];
    const when = new Date().toLocaleTimeString();
    status.textContent = all.map((s) => s.run_id + ": " + s.total + " batches, latest step " + s.latest_step + ", mode " + s.mode + ", level " + s.level).join("; ") + (cfg.snapshot ? "" : " (refreshed " + when + ", every " + cfg.refresh_s + " s)");
    const sampling = document.getElementById("sampling");
    sampling.replaceChildren();
    all.forEach((s) => {
      if (s.stride > 1 || s.loaded < s.total) {
        sampling.appendChild(text("li", s.run_id + ": downsampled, " + s.shown + " of " + s.total + " batches drawn (every " + s.stride + (s.stride === 2 ? "nd" : s.stride === 3 ? "rd" : "th") + " of the newest " + s.loaded + ", the latest always included)", "downsampled"));
      }
    });
    document.getElementById("latest-title").textContent = "Latest batch of " + first.run_id + " (step " + first.latest_step + ")";
    const table = document.getElementById("latest");
    table.replaceChildren();
    cfg.latest_fields.forEach((name) => {
      if (!(name in first.latest) || first.latest[name] === null) return;
      const row = document.createElement("tr");
      row.appendChild(text("th", name));
      row.appendChild(text("td", fmt(first.latest[name])));
      table.appendChild(row);
    });
    const warnings = document.getElementById("warnings");
    warnings.replaceChildren();
    if (first.warnings.length) {
      warnings.appendChild(text("h3", "Warnings"));
      const list = document.createElement("ul");
      first.warnings.forEach((w) => list.appendChild(text("li", w, "warn")));
      warnings.appendChild(list);
    } else {
      warnings.appendChild(text("p", "No health warnings."));
    }
  }

  async function refresh() {
    try {
      const all = cfg.snapshot || (await Promise.all(cfg.runs.map(fetchSeries)));
      cfg.charts.forEach((chart) => Plotly.react("chart-" + chart.id, traces(chart, all), layout(chart), { displayModeBar: false }));
      describe(all);
      document.body.dataset.rendered = String(Number(document.body.dataset.rendered || 0) + 1);
    } catch (err) {
      document.getElementById("status").textContent = "could not load: " + err.message + " (retrying every " + cfg.refresh_s + " s)";
    }
  }

  refresh();
  if (!cfg.snapshot) setInterval(refresh, cfg.refresh_s * 1000);
})();
